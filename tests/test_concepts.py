"""CSR concept tasks: `concepts` and `concept_regions` through the real server (Slicer- and
OHIF-shaped), clinician interaction (boxes, rejected concepts), and the `concepts` train task
learning from a drawn, concept-named segment and pruning prototypes."""
import json
import shutil

import nrrd
import numpy as np
import pytest
import torch
import requests
import SimpleITK as sitk
from test_server import assert_still_serving

from clinlens.data.phantoms import DERM_CONCEPTS, DERM_DIAGNOSES
from clinlens.models.clip import DEFAULT_CLIP_DIR
from clinlens.server import read_multipart, slicer_post


def first(server, prefix):
    ids = sorted(requests.get(server.url + "/datastore/?output=all").json()["objects"])
    return next(i for i in ids if i.startswith(prefix))


def concepts_json(server, image, params):
    r = slicer_post(f"{server.url}/infer/concepts?image={image}", params)
    assert r.status_code == 200, r.text
    return json.loads(read_multipart(r)["params"].content), read_multipart(r)


def test_info_lists_the_concept_tasks(server):
    models = requests.get(server.url + "/info/").json()["models"]
    assert models["concepts"]["type"] == "classification"
    assert models["concept_regions"]["type"] == "segmentation"  # stock Slicer and OHIF can run it
    assert {"concepts", "prompt_learner"} <= set(requests.get(server.url + "/info/").json()["trainers"])


def test_concepts_explains_a_derm_classification(server):
    image = first(server, "derm")
    res, parts = concepts_json(server, image, {})
    probs = {c["class"]: c["probability"] for c in res["classes"]}
    assert set(probs) == set(DERM_DIAGNOSES) and abs(sum(probs.values()) - 1) < 1e-3
    assert {c["concept"] for c in res["concepts"]} == set(DERM_CONCEPTS)
    assert len(res["prototypes"]) == 5
    H, W = sitk.GetArrayFromImage(sitk.ReadImage(str(_download(server, image)))).shape[:2]
    for p in res["prototypes"]:
        x0, y0, x1, y1 = p["evidence_box"]
        assert 0 <= x0 < x1 <= W and 0 <= y0 < y1 <= H
        assert p["atlas"]["prototype_id"] == p["prototype_id"] and p["atlas"]["concept"] == p["concept"]
        S = 224  # the derm model's input: the atlas box in fractions of its training image
        assert p["atlas"]["box_relative"] == [round(v / S, 4) for v in p["atlas"]["box"]]
        assert 0 <= min(p["atlas"]["box_relative"]) and max(p["atlas"]["box_relative"]) <= 1
    assert "image" in parts  # a thin labelmap, so stock Slicer does not crash on the answer


def _download(server, image):
    r = requests.get(f"{server.url}/datastore/image", params={"image": image})
    p = server.tmp / f"c_{image}.png"
    p.write_bytes(r.content)
    return p


def test_clinician_boxes_and_rejected_concepts_change_the_reasoning(server):
    image = first(server, "derm")
    base, _ = concepts_json(server, image, {})
    top = base["concepts"][0]["concept"]
    rej, _ = concepts_json(server, image, {"reject_concepts": [top.upper()]})  # names as in /feedback: any case
    assert rej["concepts"][-1] == {"concept": top, "score": 0, "rejected": True}  # listed last, marked
    assert all(p["concept"] != top for p in rej["prototypes"]) and len(rej["prototypes"]) == 5
    # a negative box over the whole image leaves no evidence anywhere: every concept at the lowest cosine
    H, W = sitk.GetArrayFromImage(sitk.ReadImage(str(_download(server, image)))).shape[:2]
    whole = {"boxes": [{"box": [0, 0, W, H], "polarity": "negative"}]}
    neg, _ = concepts_json(server, image, whole)
    assert all(c["score"] == -1 for c in neg["concepts"])
    # ... and a rejected concept (score 0, above -1) still does not lead the explanation
    both, _ = concepts_json(server, image, {**whole, "reject_concepts": [top]})
    assert both["concepts"][0]["concept"] != top and both["concepts"][-1]["concept"] == top
    assert all(p["concept"] != top for p in both["prototypes"])
    # Slicer's roi is a positive box: outside it evidence counts alpha times. The evidence box is where the
    # score comes from: in the box's patches whenever the score beats what outside can give (2·alpha - 1)
    for alpha in (0.0, 0.2):
        pos, _ = concepts_json(server, image, {"roi": [0, W // 4, 0, H // 4, 0, 0], "alpha": alpha,
                                               "top_prototypes": 24})
        inside = [p for p in pos["prototypes"] if p["score"] > 2 * alpha - 1]
        assert inside
        for p in inside:
            x0, y0, x1, y1 = p["evidence_box"]
            assert x0 < W // 4 + W // 14 and y0 < H // 4 + H // 14, (alpha, p)  # the evidence sits in the box's patches


@pytest.mark.parametrize("params,words", [
    ({"reject_concepts": ["unicorn"]}, "unknown concept"),
    ({"reject_concepts": 5}, "'reject_concepts' must be a list of concept names"),
    ({"alpha": 2}, "'alpha' must be in [0, 1]"),
    ({"alpha": "nan"}, "'alpha' must be a finite number"),
    ({"boxes": [{"box": [5, 5, 5, 9], "polarity": "positive"}]}, "is empty"),
    ({"boxes": [{"box": [0, 0, 100_000, 9]}]}, "lies outside the image"),
    ({"boxes": [{"box": [0, 0, 4, 4], "polarity": "sideways"}]}, "polarity must be one of"),
    ({"boxes": [{"box": [0, 0, 4, 4], "polarity": None}]}, "polarity must be one of"),
    ({"boxes": [{"box": ["a", 0, 4, 4]}]}, "4 finite numbers"),
    ({"boxes": [{"box": [None, 0, 4, 4]}]}, "4 finite numbers"),
    ({"boxes": [[0, 0, 4, 4]]}, "each box must be"),
    ({"top_prototypes": "many"}, "'top_prototypes' must be a number"),
])
def test_concepts_bad_input(server, params, words):
    r = slicer_post(f"{server.url}/infer/concepts?image={first(server, 'derm')}", params)
    assert r.status_code == 422 and words in r.json()["detail"], r.text
    assert_still_serving(server)


def test_concept_regions_names_its_labels_for_stock_viewers(server):
    image = first(server, "derm")
    params = {"result_extension": ".nrrd", "result_dtype": "uint8", "result_compress": False,
              "restore_label_idx": False}
    r = requests.post(f"{server.url}/infer/concept_regions", params={"image": image, "output": "all"},
                      files={"params": (None, json.dumps(params))})
    assert r.status_code == 200, r.text
    parts = read_multipart(r)
    res = json.loads(parts["params"].content)
    p = server.tmp / "regions.nrrd"
    p.write_bytes(parts["image"].content)
    lab, _ = nrrd.read(str(p), index_order="C")
    assert res["regions"] and set(np.unique(lab)) - {0} == {g["label"] for g in res["regions"]}
    for name, idx in res["label_names"].items():
        concept, score = name.rsplit(" ", 1)
        assert concept in DERM_CONCEPTS and 0 <= float(score) <= 1 and (lab == idx).any()


def test_prompt_classify_returns_classes_and_concept_weights(server):
    image = first(server, "derm")
    r = slicer_post(f"{server.url}/infer/prompt_classify?image={image}", {})
    assert r.status_code == 200, r.text
    res = json.loads(read_multipart(r)["params"].content)
    probs = [c["probability"] for c in res["classes"]]
    assert {c["class"] for c in res["classes"]} == set(DERM_DIAGNOSES) and abs(sum(probs) - 1) < 1e-3
    alpha = {w["concept"]: w["alpha"] for w in res["concept_weights"]}
    # α is over the predicted class's concepts (the shipped learner's list), which sum to 1; no zero entries
    class_concepts = json.loads((DEFAULT_CLIP_DIR / "prompt_derm.json").read_text())["config"]["class_concepts"]
    assert set(alpha) == set(class_concepts[res["classes"][0]["class"]]) and set(alpha) <= set(DERM_CONCEPTS)
    assert abs(sum(alpha.values()) - 1) < 1e-3 and min(alpha.values()) > 0
    assert requests.get(server.url + "/info/").json()["models"]["prompt_classify"]["type"] == "classification"


def test_a_volume_without_a_slice_is_read_on_its_strongest_slice(server, studies):
    """OHIF sends no `slice`: the concept tasks read the slice whose strongest concept scores highest (within an
    roi's slices when there is an roi), and say which."""
    image = first(server, "ct")
    depth, H, W = sitk.GetArrayFromImage(sitk.ReadImage(str(studies / f"{image}.nii.gz"))).shape
    auto, parts = concepts_json(server, image, {})
    k = auto["slice"]
    top = lambda z: concepts_json(server, image, {"slice": z})[0]["concepts"][0]["score"]  # noqa: E731
    assert auto["concepts"][0]["score"] == top(k)
    assert all(top(z) <= top(k) for z in {0, depth // 4, depth // 2, 3 * depth // 4, depth - 1})
    p = server.tmp / "auto_frame.nii.gz"
    p.write_bytes(parts["image"].content)
    lab = sitk.GetArrayFromImage(sitk.ReadImage(str(p)))
    assert lab[k].any() and not np.delete(lab, k, axis=0).any()  # the thin frame sits on that slice
    z0 = 0 if k > depth // 2 else depth - 3  # an roi away from it: the search keeps to the roi's slices
    inside, _ = concepts_json(server, image, {"roi": [0, W - 1, 0, H - 1, z0, z0 + 2]})
    assert z0 <= inside["slice"] <= z0 + 2


def test_concepts_on_a_chosen_ct_slice(server):
    image = first(server, "ct")
    res, parts = concepts_json(server, image, {"slice": 3})
    assert {c["concept"] for c in res["concepts"]} == {"lung nodule", "lung mass", "pleural effusion"}
    p = server.tmp / "ct_frame.nii.gz"
    p.write_bytes(parts["image"].content)
    lab = sitk.GetArrayFromImage(sitk.ReadImage(str(p)))
    assert lab[3].any() and not np.delete(lab, 3, axis=0).any()
    # the other two tasks on the same slice: evidence regions on that slice only, the CT classes and α
    r = slicer_post(f"{server.url}/infer/concept_regions?image={image}", {"slice": 3, "top_concepts": 3})
    assert r.status_code == 200, r.text
    parts = read_multipart(r)
    res = json.loads(parts["params"].content)
    p.write_bytes(parts["image"].content)
    lab = sitk.GetArrayFromImage(sitk.ReadImage(str(p)))
    assert lab.shape[0] > 3 and not np.delete(lab, 3, axis=0).any()
    assert set(np.unique(lab[3])) - {0} == {g["label"] for g in res["regions"]}
    assert {g["concept"] for g in res["regions"]} <= {"lung nodule", "lung mass", "pleural effusion"}
    r = slicer_post(f"{server.url}/infer/prompt_classify?image={image}", {"slice": 3})
    assert r.status_code == 200, r.text
    res = json.loads(read_multipart(r)["params"].content)
    assert {c["class"] for c in res["classes"]} == {"normal", "lung nodule", "lung cancer", "pleural effusion"}
    r = slicer_post(f"{server.url}/infer/prompt_classify?image={image}", {"slice": 10_000})
    assert r.status_code == 422 and "'slice' 10000 is out of range" in r.json()["detail"]


def test_train_task_learns_from_a_drawn_concept_segment_and_prunes(studies, tmp_path):
    from monailabel.datastore.local import LocalDatastore

    from clinlens.data.studies import LABELS
    from clinlens.infer.concepts import LazyCSR, LazyPromptLearner
    from clinlens.models.clip import LazyClip
    from clinlens.models.csr import CSRModel
    from clinlens.trainers.concepts_task import ConceptsTrain, PromptLearnerTrain, datastore_items

    root = tmp_path / "studies"
    shutil.copytree(studies, root)
    ds = LocalDatastore(str(root), extensions=["*.png", "*.nii.gz"], auto_reload=False)
    derm = sorted(i for i in ds.list_images() if i.startswith("derm"))[0]
    img = sitk.GetArrayFromImage(sitk.ReadImage(ds.get_image_uri(derm)))
    lab = np.zeros(img.shape[:2], np.uint8)
    lab[20:60, 30:90] = 10
    p = tmp_path / "drawn.png"
    sitk.WriteImage(sitk.GetImageFromArray(lab), str(p))
    ds.save_label(derm, str(p), "final", {"label_info": [{"name": "pigment network", "idx": 10}]})
    for i in sorted(i for i in ds.list_images() if i.startswith("derm")):  # feedback: diagnoses in image info
        dx = json.loads((root / "clinlens" / f"{i}.json").read_text())["diagnosis"]
        ds.update_image_info(i, {"diagnosis": dx})
    items = datastore_items(ds, LABELS)
    mine = next(it for it in items["derm"] if it[0] == derm)
    assert mine[2]["pigment network"] == 1 and mine[4]["pigment network"].sum() == 40 * 60

    clip = LazyClip()
    csr, prompts = LazyCSR(clip, tmp_path / "model"), LazyPromptLearner(clip, tmp_path / "model")
    shipped = csr.get("derm")
    task = ConceptsTrain(csr, LABELS, prompts)
    out = task({"steps": 5, "prune": {"derm": [0, 1]}}, ds)
    assert out["derm"]["drawn_regions"] >= 1 and out["derm"]["pruned"] == [0, 1]
    assert out["derm"]["region_weight"] == shipped.config["region_weight"] == 1.0  # the model's own by default
    assert csr.path("derm") == tmp_path / "model" / "csr_derm.safetensors"
    trained = CSRModel.load(csr.clip.get(), csr.path("derm"))
    assert {0, 1}.isdisjoint(trained.proto_ids.tolist()) and trained.n_prototypes == shipped.n_prototypes - 2
    assert csr.get("derm").n_prototypes == trained.n_prototypes  # inference picks up the published model
    assert task.stats()["status"] == "DONE"
    assert out["derm_prompts"]["images"] == len(items["derm"]) and out["derm_prompts"]["steps"] == 5
    assert prompts.path("derm") == tmp_path / "model" / "prompt_derm.safetensors"
    few = PromptLearnerTrain(prompts, LABELS)({"steps": 3, "shots": 1}, ds)
    assert few["derm"]["images"] == len({it[3] for it in items["derm"]}) and few["derm"]["shots"] == 1
    # the drawn regions' patch supervision can be reweighted per request, and is kept in the published model
    before = csr.path("derm").read_bytes()
    with pytest.raises(ValueError, match="'region_weight' must be in"):
        task({"steps": 1, "region_weight": -2}, ds)
    assert csr.path("derm").read_bytes() == before
    assert task({"steps": 1, "region_weight": None}, ds)["derm"]["region_weight"] == 1.0  # null keeps the model's
    assert task({"steps": 1, "region_weight": "0"}, ds)["derm"]["region_weight"] == 0.0
    assert CSRModel.load(csr.clip.get(), csr.path("derm")).config["region_weight"] == 0.0
    # the backbone: kept frozen by default, fine-tuned on request (then saved with the model); bad values refused
    before = csr.path("derm").read_bytes()
    for bad, words in (({"backbone": "thaw"}, "'backbone' must be one of"), ({"backbone_lr": 5}, "'backbone_lr' must be in")):
        with pytest.raises(ValueError, match=words):
            task({"steps": 1, **bad}, ds)
    assert csr.path("derm").read_bytes() == before
    assert "backbone_lr" not in out["derm"] and not trained.config["finetune_backbone"]
    ft = task({"steps": 2, "backbone": "fine-tune", "backbone_lr": 1e-3}, ds)["derm"]
    assert ft["backbone_lr"] == 1e-3
    tuned = CSRModel.load(csr.clip.get(), csr.path("derm"))
    assert tuned.config["finetune_backbone"] and tuned.backbone is not csr.clip.get().model.vision_model
    assert csr.get("derm").config["finetune_backbone"]  # inference picks up the fine-tuned model


def test_train_task_prunes_the_prototypes_firing_on_a_drawn_marker(studies, tmp_path):
    """Firing-map pruning: segments named "Text Marker" on a few images; the prototypes peaking there are pruned."""
    from monailabel.datastore.local import LocalDatastore

    from clinlens.data.studies import LABELS
    from clinlens.infer.concepts import LazyCSR
    from clinlens.models.clip import LazyClip
    from clinlens.models.csr import CSRModel
    from clinlens.trainers.concepts_task import ConceptsTrain, datastore_items

    root = tmp_path / "studies"
    shutil.copytree(studies, root)
    ds = LocalDatastore(str(root), extensions=["*.png", "*.nii.gz"], auto_reload=False)
    derm = sorted(i for i in ds.list_images() if i.startswith("derm"))
    for i in derm:
        dx = json.loads((root / "clinlens" / f"{i}.json").read_text())["diagnosis"]
        ds.update_image_info(i, {"diagnosis": dx})

    def draw(image, box):
        img = sitk.GetArrayFromImage(sitk.ReadImage(ds.get_image_uri(image)))
        lab = np.zeros(img.shape[:2], np.uint8)
        y0, y1, x0, x1 = box
        lab[y0:y1, x0:x1] = 3
        p = tmp_path / f"{image}_marker.png"
        sitk.WriteImage(sitk.GetImageFromArray(lab), str(p))
        ds.save_label(image, str(p), "final", {"label_info": [{"name": "Text Marker", "idx": 3}]})
        return lab > 0

    masks = {i: draw(i, (96, 160, 96, 160)) for i in derm[:2]}  # on the lesion, where prototypes fire
    items = datastore_items(ds, LABELS, "text marker")["derm"]
    marked = [it for it in items if "text marker" in it[4]]
    assert len(derm) >= 2 and sorted(it[0] for it in marked) == derm[:2]
    assert all("text marker" not in it[2] for it in marked)  # an artefact, not a concept

    csr = LazyCSR(LazyClip(), tmp_path / "model")
    shipped = csr.get("derm").n_prototypes
    task = ConceptsTrain(csr, LABELS)
    out = task({"steps": 5, "prune_firing_on": "Text Marker", "fire_share": 0.0}, ds)["derm"]
    fired = out["firing_on"]["pruned"]
    assert fired, "no prototype peaks on the marker corner: the check below would be vacuous"
    assert out["firing_on"]["images"] == 2 and out["pruned"] == fired
    bundle = csr.clip.get()
    trained = CSRModel.load(bundle, csr.path("derm"))
    assert trained.n_prototypes == shipped - len(fired) and set(fired).isdisjoint(trained.proto_ids.tolist())
    # the prototypes left never peak on the marker (share 0): pruning took exactly those that did
    feats = trained.features(torch.cat([bundle.pixel_values(it[1]) for it in marked]))
    assert float(trained.firing_rates(feats, [masks[it[0]] for it in marked]).max()) == 0.0
    # bad requests are refused before any training: a segment nobody drew, a share outside [0, 1)
    before = csr.path("derm").read_bytes()
    with pytest.raises(ValueError, match="no final label has a segment named 'ruler'"):
        task({"steps": 1, "prune_firing_on": "ruler"}, ds)
    with pytest.raises(ValueError, match="'fire_share' must be in"):
        task({"steps": 1, "prune_firing_on": "text marker", "fire_share": 1.5}, ds)
    assert csr.path("derm").read_bytes() == before
    # a region everywhere: every prototype fires on it, and the task says so instead of pruning them all
    draw(derm[0], (0, 10_000, 0, 10_000))
    with pytest.raises(ValueError, match="every prototype fires"):
        task({"steps": 1, "prune_firing_on": "text marker", "fire_share": 0.0}, ds)


def test_batch_infer_keeps_classification_results_in_the_datastore(server):
    """/batch/infer/<model> on a classification task: stock MONAI Label drops results without a label file."""
    ids = sorted(i for i in requests.get(server.url + "/datastore/?output=all").json()["objects"] if i.startswith("derm"))[:2]
    r = requests.post(f"{server.url}/batch/infer/concepts", params={"run_sync": True},
                      json={"images": ids, "max_workers": 1})  # the endpoint defaults: device cuda, multi_gpu
    assert r.status_code == 200, r.text
    for image in ids:
        info = requests.get(f"{server.url}/datastore/image/info", params={"image": image}).json()
        kept = info["clinlens_results"]["concepts"]
        live, _ = concepts_json(server, image, {})
        assert kept["tag"] == "original" and kept["saved"]
        assert [c["class"] for c in kept["params"]["classes"]] == [c["class"] for c in live["classes"]]
        for a, b in zip(kept["params"]["classes"], live["classes"]):
            assert a["probability"] == pytest.approx(b["probability"], abs=1e-5)


@pytest.mark.parametrize("family", ["derm", "chest", "ct"])
def test_phantom_items_carry_their_concept_masks_as_drawn_regions(family):
    from clinlens.trainers.concepts import phantom_concept_items

    plain = phantom_concept_items(family, 3, 12)
    drawn = phantom_concept_items(family, 3, 12, drawn=True)
    assert all(p[4] == {} for p in plain)
    n = 0
    for p, d in zip(plain, drawn):
        assert p[0] == d[0] and p[2] == d[2] and np.array_equal(p[1], d[1])  # the same images and labels
        for name, mask in d[4].items():
            assert d[2][name] == 1 and mask.shape == d[1].shape[:2] and mask.any()  # present concepts only, 2D
            n += 1
    assert n > 0


def test_the_shipped_csr_files_record_the_training_train_default_gives_them(tmp_path):
    """The embedded CSR files match `SHIPPED` (a setting changed without retraining is caught), and a file trained
    otherwise is told apart (benchmarks/concepts.py then retrains its drawn share 1 arm instead of reusing it)."""
    from clinlens.trainers.concepts import CSR_FAMILIES, SHIPPED, csr_file, shipped_training_record

    for family in CSR_FAMILIES:
        assert shipped_training_record(DEFAULT_CLIP_DIR, family)["family"] == family
    info = json.loads(csr_file(DEFAULT_CLIP_DIR, "chest").with_suffix(".json").read_text())
    changes = [("training", "images", 100), ("training", "seed", 1), ("training", "pruned", [3]),
               ("training", "command", "concepts train task"),
               ("config", "input_size", SHIPPED["chest"].get("input_size", 224) + 224)]
    for part, key, value in changes:
        other = json.loads(json.dumps(info))
        other[part][key] = value
        csr_file(tmp_path, "chest").with_suffix(".json").write_text(json.dumps(other))
        assert shipped_training_record(tmp_path, "chest") is None, (part, key)
    assert shipped_training_record(tmp_path, "derm") is None  # no file


def _dx_copy(path):
    """A real single-frame DICOM slice (pydicom's CT_small) relabelled as a radiograph (Modality DX)."""
    import pydicom
    from pydicom.data import get_testdata_file

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.Modality = "DX"
    for key in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):  # its own study, not CT_small's
        setattr(ds, key, pydicom.uid.generate_uid(entropy_srcs=["clinlens dx", key]))
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(str(path))
    return path


def test_a_single_frame_radiograph_reads_as_chest_and_a_ct_slice_as_ct(tmp_path):
    """The image family (and so the vocabulary and models) of one-slice images: a DICOM radiograph loads as a
    (1, H, W) volume, as it comes from a DICOMweb study, and must not be read as CT."""
    from pydicom.data import get_testdata_file

    from clinlens.data.image_io import load_image
    from clinlens.infer.base import family_of

    ct = load_image(get_testdata_file("CT_small.dcm"))
    dx = load_image(_dx_copy(tmp_path / "dx.dcm"))
    assert ct.spatial_shape == dx.spatial_shape and len(dx.spatial_shape) == 3 and dx.spatial_shape[0] == 1
    assert (ct.modality, family_of(ct)) == ("CT", "ct") and (dx.modality, family_of(dx)) == ("DX", "chest")
    one = tmp_path / "one.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((1, 32, 40), np.int16)), str(one))
    many = tmp_path / "many.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((5, 32, 40), np.int16)), str(many))
    assert family_of(load_image(one)) == "chest" and family_of(load_image(many)) == "ct"  # no modality: by depth


def test_concepts_on_an_uploaded_dicom_radiograph_uses_the_chest_vocabulary(server, tmp_path):
    dx = _dx_copy(tmp_path / "dx.dcm")
    r = requests.post(f"{server.url}/infer/concepts", params={"output": "all"},
                      files={"file": ("dx.dcm", dx.read_bytes()), "params": (None, "{}")})
    assert r.status_code == 200, r.text
    res = json.loads(read_multipart(r)["params"].content)
    from clinlens.trainers.concepts import CSR_FAMILIES

    assert {c["concept"] for c in res["concepts"]} == set(CSR_FAMILIES["chest"][0])
    assert {c["class"] for c in res["classes"]} == set(CSR_FAMILIES["chest"][1])


@pytest.mark.parametrize("params,words", [
    ({"prune": {"derm": [99_999]}}, "'prune.derm': prototype id(s) [99999] do not exist"),
    ({"prune": {"mri": [1]}}, "unknown image family 'mri'"),
    ({"prune": [0, 1]}, "'prune' must be {family: [prototype ids]}"),
    ({"prune": '{"derm": ["x"]}'}, "'prune.derm' must be a list of integer prototype ids"),
    ({"steps": "many"}, "'steps' must be a number"),
    ({"add_concepts": {"derm": [5]}}, "'add_concepts.derm': each entry is a name"),
    ({"add_concepts": ["veil"]}, "'add_concepts' must be {family:"),
    ({"backbone": "thaw"}, "'backbone' must be one of"),
])
def test_bad_train_options_are_refused_before_training_starts(server, params, words):
    runs = lambda: requests.get(f"{server.url}/train/", params={"all": True}).json()  # noqa: E731
    before = runs()
    r = requests.post(f"{server.url}/train/concepts", json=params)
    assert r.status_code == 422 and words in r.json()["detail"], r.text
    assert runs() == before  # no training was started
    assert_still_serving(server)


def test_a_volume_trains_on_its_most_drawn_slice(studies, tmp_path):
    """CT volumes feed the concepts train task: the axial slice where their concept-named segments have the most
    voxels (as inference reads a slice); a volume with no such segment is skipped and named; a one-slice DICOM
    radiograph trains as a chest image."""
    from monailabel.datastore.local import LocalDatastore

    from clinlens.data.studies import LABELS
    from clinlens.trainers.concepts_task import datastore_items

    root = tmp_path / "studies"
    shutil.copytree(studies, root)
    _dx_copy(root / "dx.dcm")
    ds = LocalDatastore(str(root), extensions=["*.png", "*.nii.gz", "*.dcm"], auto_reload=False)
    cts = sorted(i for i in ds.list_images() if i.startswith("ct"))
    labelled = set(ds.get_labeled_images())
    assert any(i in labelled for i in cts) and any(i not in labelled for i in cts)
    ds.update_image_info("dx", {"diagnosis": "normal"})
    skipped = []
    items = datastore_items(ds, LABELS, skipped=skipped)
    assert sorted(skipped) == sorted(i for i in cts if i not in labelled)
    assert [it[0] for it in items["chest"] if it[0] == "dx"] == ["dx"]
    for i in (i for i in cts if i in labelled):
        vol = sitk.GetArrayFromImage(sitk.ReadImage(ds.get_image_uri(i)))
        lab = sitk.GetArrayFromImage(sitk.ReadImage(ds.get_label_uri(i, "final")))
        k = int((lab > 0).sum((1, 2)).argmax())
        it = next(it for it in items["ct"] if it[0] == i)
        assert it[1].shape[:2] == vol.shape[1:] and it[4]
        for name, mask in it[4].items():
            assert it[2][name] == 1 and mask.shape == vol.shape[1:]
            assert np.array_equal(mask, lab[k] == LABELS[name])  # the drawn region of that very slice


def test_a_concept_added_by_text_learns_from_its_drawn_segment_and_is_served(studies, tmp_path):
    """`add_concepts`: a clinician names a new concept in words and draws it; training adds it by text (its
    prototypes start at the text anchor) and learns it from the drawn region; inference, rejection and
    feedback then know it."""
    from monailabel.datastore.local import LocalDatastore

    from clinlens.activelearning.feedback import validate_feedback
    from clinlens.data.conventions import RequestError
    from clinlens.data.image_io import load_image
    from clinlens.data.studies import LABELS
    from clinlens.infer.concepts import ConceptsInfer, LazyCSR
    from clinlens.models.clip import LazyClip
    from clinlens.trainers.concepts_task import ConceptsTrain, family_concepts, parse_add_concepts

    root = tmp_path / "studies"
    shutil.copytree(studies, root)
    ds = LocalDatastore(str(root), extensions=["*.png"], auto_reload=False)
    derm = sorted(i for i in ds.list_images() if i.startswith("derm"))
    img = sitk.GetArrayFromImage(sitk.ReadImage(ds.get_image_uri(derm[0])))
    lab = np.zeros(img.shape[:2], np.uint8)
    lab[100:140, 90:150] = 4
    p = tmp_path / "regression.png"
    sitk.WriteImage(sitk.GetImageFromArray(lab), str(p))
    ds.save_label(derm[0], str(p), "final", {"label_info": [{"name": "Regression Structures", "idx": 4}]})
    csr = LazyCSR(LazyClip(), tmp_path / "model")
    shipped = csr.get("derm")
    assert parse_add_concepts({"derm": ["Streaks"]}, csr) == {}  # known already: nothing to add
    task = ConceptsTrain(csr, LABELS)
    with pytest.raises(ValueError, match=r"no derm image shows \['halo'\]"):
        task({"steps": 1, "add_concepts": {"derm": ["halo"]}}, ds)
    assert task.stats()["status"] == "FAILED" and "no derm image shows ['halo']" in task.stats()["error"]
    out = task({"steps": 5, "add_concepts": json.dumps(
        {"derm": [{"name": "regression structures", "description": "white scar-like areas with grey peppering"}]})}, ds)["derm"]
    model = csr.get("derm")
    assert task.stats()["status"] == "DONE"
    assert out["added_concepts"] == ["regression structures"] and len(out["added_prototypes"]) == shipped.config["n_prototypes"]
    assert model.concepts == [*shipped.concepts, "regression structures"] and family_concepts(csr, "derm") == model.concepts
    assert model.descriptions[-1] == "white scar-like areas with grey peppering" and out["drawn_regions"] >= 1
    new = set(out["added_prototypes"])
    assert new <= set(model.proto_ids.tolist()) and {e["prototype_id"] for e in model.atlas} >= new
    # served: scored, rejectable by name, and a valid feedback name for derm images
    res = ConceptsInfer(csr).run({"reject_concepts": ["Regression Structures"]}, load_image(ds.get_image_uri(derm[0])))[1]
    assert res["concepts"][-1] == {"concept": "regression structures", "score": 0, "rejected": True}
    assert validate_feedback({"reject_concepts": "regression structures"}, model.concepts, DERM_DIAGNOSES)
    with pytest.raises(RequestError, match="unknown concept"):
        validate_feedback({"reject_concepts": "regression structures"}, shipped.concepts, DERM_DIAGNOSES)
    # sending the option again with the next training adds nothing twice
    again = task({"steps": 1, "add_concepts": {"derm": ["regression structures"]}}, ds)["derm"]
    assert "added_concepts" not in again and csr.get("derm").concepts == model.concepts
