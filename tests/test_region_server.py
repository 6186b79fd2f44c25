"""Region tasks through the real server, shaped as Slicer and OHIF send them."""
import json

import nrrd
import numpy as np
import pytest
import requests
import SimpleITK as sitk
from test_server import assert_still_serving

from clinlens.server import read_multipart, slicer_post


def truth(studies, image_id):
    return json.loads((studies / "clinlens" / f"{image_id}.json").read_text())


def labelled(studies, family):
    """(id, record, label array) of labelled images of a family that have at least one finding."""
    out = []
    for rec in json.loads((studies / "clinlens" / "index.json").read_text())["images"]:
        if rec["family"] == family and rec["label"]:
            t = truth(studies, rec["id"])
            if t["boxes"]:
                lab = sitk.GetArrayFromImage(sitk.ReadImage(str(studies / rec["label"])))
                out.append((rec["id"], t, lab))
    return out


def slicer_infer(server, model, image, params):
    return slicer_post(f"{server.url}/infer/{model}?image={image}", params)


def dice(a, b):
    a, b = a > 0, b > 0
    return 2 * (a & b).sum() / max(a.sum() + b.sum(), 1)


def test_info_lists_region_models_for_both_viewers(server):
    models = requests.get(server.url + "/info/").json()["models"]
    assert models["region_seg"]["type"] == "deepgrow" and models["region_seg"]["dimension"] == 2
    assert models["region_seg_3d"]["type"] == "deepgrow" and models["region_seg_3d"]["dimension"] == 3
    assert models["text_seg"]["type"] == "segmentation"
    assert models["text_seg"]["config"]["prompt"][0] == "nodule"  # Slicer's option box default


def test_slicer_click_on_a_chest_finding(server, studies):
    image, t, lab = labelled(studies, "chest")[0]
    name, box = next(iter(t["boxes"].items()))
    obj = lab == t["labels"][name]
    ys, xs = np.nonzero(obj)
    c = int(np.argmin((xs - xs.mean()) ** 2 + (ys - ys.mean()) ** 2))
    r = slicer_infer(server, "region_seg", image, {"foreground": [[int(xs[c]), int(ys[c]), 0]], "background": [],
                                                   "label": name, "slice": 0})
    assert r.status_code == 200, r.text
    parts = read_multipart(r)
    res = json.loads(parts["params"].content)
    assert res["label_names"] == {name: 1} and len(res["what_is_here"]) == 3
    assert res["latencies"]["total_ms"] > 0
    path = server.tmp / "region.png"
    path.write_bytes(parts["image"].content)
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    assert mask.shape == lab.shape and mask[ys[c], xs[c]] == 1
    assert dice(mask, obj) > 0.4, dice(mask, obj)


def test_slicer_unsorted_roi_box(server, studies):
    image, t, lab = labelled(studies, "chest")[0]
    name, (x0, y0, x1, y1) = next(iter(t["boxes"].items()))
    roi = [x1 - 1, x0, y1 - 1, y0, 0, 0]  # Slicer's interleaved pairs, unsorted
    r = slicer_infer(server, "region_seg", image, {"roi": roi, "foreground": [], "background": [], "label": name})
    assert r.status_code == 200, r.text
    path = server.tmp / "box.png"
    path.write_bytes(read_multipart(r)["image"].content)
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    inside = mask[y0:y1, x0:x1].sum()
    assert inside > 0 and inside >= 0.8 * mask.sum()


def test_follow_up_click_reuses_the_trunk(server, studies):
    image, t, lab = labelled(studies, "chest")[0]
    name, (x0, y0, x1, y1) = next(iter(t["boxes"].items()))
    cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
    p = {"foreground": [[cx, cy, 0]], "background": [], "label": "again", "use_previous_mask": True}
    first = json.loads(read_multipart(slicer_infer(server, "region_seg", image, p))["params"].content)
    p["background"] = [[min(x1 + 2, lab.shape[1] - 1), cy, 0]]
    second = json.loads(read_multipart(slicer_infer(server, "region_seg", image, p))["params"].content)
    assert second["cached"] and second["mask_prompt"]
    assert second["window"] == first["window"]
    p["background"].append([max(x0 - 3, 0), cy, 0])
    p["use_previous_mask"] = False
    third = json.loads(read_multipart(slicer_infer(server, "region_seg", image, p))["params"].content)
    assert third["cached"] and not third["mask_prompt"]


def test_ohif_3d_click_on_ct_lesion_propagates(server, studies):
    image, t, lab = labelled(studies, "ct")[0]
    name, (x0, y0, z0, x1, y1, z1) = next(iter(t["boxes"].items()))
    obj = lab == t["labels"][name]
    zc = int(np.argmax(obj.sum(axis=(1, 2))))
    ys, xs = np.nonzero(obj[zc])
    c = int(np.argmin((xs - xs.mean()) ** 2 + (ys - ys.mean()) ** 2))
    params = {"foreground": [[int(xs[c]), int(ys[c]), zc]], "background": [], "result_extension": ".nrrd",
              "result_dtype": "uint8", "result_compress": False, "restore_label_idx": False}
    r = requests.post(f"{server.url}/infer/region_seg_3d", params={"image": image, "output": "image"},
                      files={"params": (None, json.dumps(params))})
    assert r.status_code == 200, r.text
    data, header = nrrd.read(str(_save(server, "ct3d.nrrd", r.content)))
    vol = np.transpose(data, (2, 1, 0))  # NRRD is IJK; compare in array order
    assert vol.shape == lab.shape and vol[zc, ys[c], xs[c]] == 1
    if obj.any(axis=(1, 2)).sum() > 1:
        assert vol.any(axis=(1, 2)).sum() > 1  # propagated beyond the clicked slice
    assert dice(vol, obj) > 0.3, dice(vol, obj)


def _save(server, name, content):
    p = server.tmp / name
    p.write_bytes(content)
    return p


def test_text_seg_answers_with_a_mask_and_a_verdict(server, studies):
    image, t, lab = labelled(studies, "chest")[0]
    name = next(iter(t["boxes"]))
    r = slicer_infer(server, "text_seg", image, {"prompt": name})
    assert r.status_code == 200, r.text
    parts = read_multipart(r)
    res = json.loads(parts["params"].content)
    assert res["prompt"] == name and isinstance(res["found"], bool) and 0 <= res["score"] <= 1
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(_save(server, "text.png", parts["image"].content))))
    assert mask.shape == lab.shape and (mask.any() == res["found"])
    # the default contrast: the prompt competes with the chest family's other findings
    assert res["contrast"] == "vocabulary" and name not in res["competitors"] and len(res["competitors"]) >= 4
    # the 2-way rule, asked for explicitly, scores against the negation alone and so never scores lower
    r2 = slicer_infer(server, "text_seg", image, {"prompt": name, "contrast": "negation"})
    res2 = json.loads(read_multipart(r2)["params"].content)
    assert res2["contrast"] == "negation" and res2["competitors"] == [] and res2["score"] >= res["score"] - 1e-4


@pytest.mark.parametrize("case,model,params,words", [
    ("outside", "region_seg", {"foreground": [[9999, 5, 0]]}, "outside the image"),
    ("nothing", "region_seg", {"foreground": [], "background": []}, "at least one foreground click or a box"),
    ("zero_box", "region_seg", {"roi": [10, 10, 20, 40, 0, 0]}, "zero area"),
    ("3d_to_2d", "region_seg", {"foreground": [[10, 10, 3]]}, "image is 2D"),
    ("slice", "region_seg", {"foreground": [[10, 10, 0]], "slice": 7}, "out of range"),
    ("ct_2d_slices", "region_seg", {"foreground": [[10, 10, 3], [12, 12, 4]]}, "2D model"),
    ("3d_model_on_2d", "region_seg_3d", {"foreground": [[10, 10, 0]]}, "needs a 3D volume"),
    ("negated_text", "text_seg", {"prompt": "no pleural effusion"}, "is negated"),
    ("empty_text", "text_seg", {"prompt": "   "}, "'prompt' must be"),
    ("contrast", "text_seg", {"prompt": "nodule", "contrast": "all"}, "'contrast' must be one of"),
])
def test_region_bad_input(server, case, model, params, words):
    ids = sorted(requests.get(server.url + "/datastore/?output=all").json()["objects"])
    image = next(i for i in ids if i.startswith("ct" if case == "ct_2d_slices" else "chest"))
    r = requests.post(f"{server.url}/infer/{model}?image={image}", files={"params": (None, json.dumps(params))})
    assert r.status_code == 422, r.text
    assert words in r.json()["detail"]
    assert_still_serving(server)


def test_mask_prompt_of_the_wrong_shape(server):
    ids = sorted(requests.get(server.url + "/datastore/?output=all").json()["objects"])
    image = next(i for i in ids if i.startswith("chest"))
    small = _save(server, "m.png", b"")
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((20, 30), np.uint8)), str(small))
    r = requests.post(f"{server.url}/infer/region_seg?image={image}",
                      files={"label": ("m.png", small.read_bytes()),
                             "params": (None, json.dumps({"foreground": [[10, 10, 0]]}))})
    assert r.status_code == 422 and "mask prompt has shape" in r.json()["detail"], r.text
    assert_still_serving(server)


def test_text_seg_competitors_drop_names_of_the_same_thing():
    from clinlens.data.phantoms import CHEST_FINDINGS, CT_FINDINGS
    from clinlens.infer.region import competitors

    assert competitors(CT_FINDINGS, "lung nodule") == ["lung mass", "pleural effusion"]
    assert "nodule" not in competitors(CHEST_FINDINGS, "Lung Nodule") and "mass" in competitors(CHEST_FINDINGS, "lung nodule")
    assert competitors(CHEST_FINDINGS, "pleural effusion") == [f for f in CHEST_FINDINGS if f != "pleural effusion"]
    assert competitors(CHEST_FINDINGS, "rib fracture") == CHEST_FINDINGS  # free text competes with every finding
