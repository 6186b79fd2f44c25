"""`explain` through the real server: quantised heat labelmaps for stock viewers, float32 maps for
plugins, negated prompts, volumes with one scale, and bad input."""
import json

import nrrd
import numpy as np
import pytest
import requests
import SimpleITK as sitk
from scipy import ndimage as ndi
from test_server import assert_still_serving

from clinlens.server import read_multipart, slicer_post

OHIF = {"result_extension": ".nrrd", "result_compress": False, "restore_label_idx": False}


def first(server, prefix):
    ids = sorted(requests.get(server.url + "/datastore/?output=all").json()["objects"])
    return next(i for i in ids if i.startswith(prefix))


def float_map(server, image, params, name="heat.nrrd"):
    r = requests.post(f"{server.url}/infer/explain", params={"image": image, "output": "all"},
                      files={"params": (None, json.dumps({**OHIF, "result_dtype": "float32", **params}))})
    assert r.status_code == 200, r.text
    parts = read_multipart(r)
    p = server.tmp / name
    p.write_bytes(parts["image"].content)
    arr, _ = nrrd.read(str(p), index_order="C")
    return arr, json.loads(parts["params"].content)


def test_info_offers_targets_and_methods(server):
    m = requests.get(server.url + "/info/").json()["models"]["explain"]
    assert m["type"] == "segmentation" and "cardiomegaly" in m["config"]["target"]
    assert m["config"]["method"][0] == "medgrad"


def test_slicer_gets_named_heat_levels(server):
    image = first(server, "chest")
    r = slicer_post(f"{server.url}/infer/explain?image={image}", {"target": "cardiomegaly"})
    assert r.status_code == 200, r.text
    parts = read_multipart(r)
    res = json.loads(parts["params"].content)
    p = server.tmp / "heat.png"
    p.write_bytes(parts["image"].content)
    lab = sitk.GetArrayFromImage(sitk.ReadImage(str(p)))
    assert set(np.unique(lab)) <= {0, 1, 2, 3, 4} and lab.max() == 4  # the hottest level is always there
    assert res["label_names"]["heat 80-100% · cardiomegaly"] == 4
    H, W = lab.shape
    for reg in res["top_regions"]:
        x0, y0, x1, y1 = reg["box"]
        assert 0 <= x0 < x1 <= W and 0 <= y0 < y1 <= H and reg["peak"] >= 0.8
    assert res["words"]["tokens"] and len(res["words"]["tokens"]) == len(res["words"]["scores"])
    assert res["evidence"] is True and "message" not in res


def test_an_empty_heatmap_is_said_in_words():
    """A flat image has no local entropy, so MedGrad's map is empty: the JSON says so."""
    from clinlens.explain.grad_eclip import explain
    from clinlens.infer.explain import evidence
    from clinlens.models.clip import load_clip

    bundle = load_clip(None, device="cpu")
    flat = explain(bundle, image=np.full((224, 224, 3), 0.4, np.float32), target_text="nodule", method="medgrad")
    assert float(flat["upsampled"].max()) == 0
    e = evidence(flat["upsampled"], "nodule")
    assert e["evidence"] is False and "nodule" in e["message"] and "empty" in e["message"]
    assert "blocks" not in e["message"] and "'blocks': 'all'" in evidence(flat["upsampled"], "nodule", True)["message"]
    rng = np.random.default_rng(0)
    textured = explain(bundle, image=rng.random((224, 224, 3), dtype=np.float32), target_text="nodule", method="medgrad")
    assert evidence(textured["upsampled"], "nodule") == {"evidence": True}


def test_all_blocks_fill_a_diagnosis_the_last_block_leaves_empty():
    """A held-out derm phantom (benchmarks/explain.py's derm5) whose last-block map of its diagnosis is empty."""
    from clinlens.data.image_io import to_unit_rgb
    from clinlens.data.phantoms import make_derm
    from clinlens.explain.grad_eclip import explain
    from clinlens.infer.explain import evidence
    from clinlens.models.clip import load_clip

    bundle = load_clip(None, device="cpu")
    s = make_derm(70 * 1_000_003 + 900_000 + 5, size=224)
    img = to_unit_rgb(s.image)
    last = explain(bundle, image=img, target_text=s.diagnosis, method="medgrad", words=False)
    every = explain(bundle, image=img, target_text=s.diagnosis, method="medgrad", words=False, blocks=6)
    assert evidence(last["upsampled"], s.diagnosis, True)["evidence"] is False
    assert evidence(every["upsampled"], s.diagnosis) == {"evidence": True}
    lesion, heat = s.masks["lesion"].astype(bool), every["upsampled"]
    # and it is on the lesion: the peak within 8 px of it (a patch is 16), more heat inside than outside
    y, x = np.unravel_index(np.argmax(heat), heat.shape)
    assert ndi.binary_dilation(lesion, iterations=8)[y, x] and heat[lesion].mean() > heat[~lesion].mean()


def test_float32_map_and_negated_prompt(server):
    image = first(server, "chest")
    pos, rp = float_map(server, image, {"prompt": "pleural effusion"})
    neg, rn = float_map(server, image, {"prompt": "no pleural effusion"}, "neg.nrrd")
    assert pos.dtype == np.float32 and 0 <= pos.min() and abs(pos.max() - 1) < 0.01  # upsampled: the grid max is 1
    assert rn["negated"] is True and rp["negated"] is False and rn["explained"] == "pleural effusion"
    np.testing.assert_allclose(pos, neg, atol=1e-5)  # "no X" is explained by the evidence for X


def test_all_blocks_is_a_choice_and_changes_the_map(server):
    assert requests.get(server.url + "/info/").json()["models"]["explain"]["config"]["blocks"] == ["all", "last"]
    image = first(server, "chest")
    every, ra = float_map(server, image, {"target": "cardiomegaly"})
    last, rl = float_map(server, image, {"target": "cardiomegaly", "blocks": "last"}, "last.nrrd")
    two, r2 = float_map(server, image, {"target": "cardiomegaly", "blocks": "2"}, "two.nrrd")
    assert ra["blocks"] > 2 and rl["blocks"] == 1 and r2["blocks"] == 2
    assert every.shape == last.shape and abs(every.max() - 1) < 0.01
    assert np.abs(every - last).max() > 0.05 and np.abs(every - two).max() > 0.05


def test_direct_gradient_is_a_choice(server):
    assert requests.get(server.url + "/info/").json()["models"]["explain"]["config"]["gradient"] == ["direct", "exact"]
    image = first(server, "chest")
    direct, rd = float_map(server, image, {"target": "cardiomegaly"}, "direct.nrrd")
    exact, re_ = float_map(server, image, {"target": "cardiomegaly", "gradient": "exact"}, "exact.nrrd")
    assert re_["gradient"] == "exact" and rd["gradient"] == "direct" and rd["blocks"] == re_["blocks"] > 1
    assert direct.shape == exact.shape and abs(direct.max() - 1) < 0.01
    assert not np.array_equal(direct, exact) and np.corrcoef(direct.ravel(), exact.ravel())[0, 1] > 0.5


def test_untouched_choice_boxes_give_each_method_its_defaults(server):
    """Slicer sends a config's whole choice list back when the user leaves it: all blocks along the direct path
    for MedGrad, the one block the attention map has."""
    image = first(server, "chest")
    info = requests.get(server.url + "/info/").json()["models"]["explain"]["config"]
    lists = {k: info[k] for k in ("blocks", "gradient")}
    for method, blocks, gradient in (("medgrad", 6, "direct"), ("attention", 1, "exact")):
        r = slicer_post(f"{server.url}/infer/explain?image={image}", {"target": "nodule", "method": method, **lists})
        assert r.status_code == 200, r.text
        res = json.loads(read_multipart(r)["params"].content)
        assert (res["blocks"], res["gradient"]) == (blocks, gradient)


def test_volume_is_explained_slice_wise_on_one_scale(server):
    image = first(server, "ct")
    heat, res = float_map(server, image, {"target": "lung nodule"}, "ct.nrrd")
    per_slice = heat.reshape(heat.shape[0], -1).max(1)
    assert heat.ndim == 3 and per_slice.max() > 0.95 and per_slice.min() < 0.9  # one scale: weaker slices stay lower


@pytest.mark.parametrize("params,words", [
    ({"target": "unicorn"}, "unknown target"),
    ({"prompt": "  "}, "'prompt' is empty"),
    ({"target": "nodule", "radius": 0}, "'radius' must be > 0"),
    ({"target": "nodule", "result_dtype": "float32", "result_extension": ".png"}, "cannot hold floats"),
    ({"target": "nodule", "method": "magic"}, "magic"),
    ({"target": "nodule", "blocks": "many"}, "'blocks' must be"),
    ({"target": "nodule", "blocks": 99}, "'blocks' must be in [1,"),
    ({"target": "nodule", "method": "attention", "blocks": "all"}, "blocks > 1 applies to medgrad and grad_eclip"),
    ({"target": "nodule", "gradient": "magic"}, "'gradient' must be one of"),
    ({"target": "nodule", "method": "attention", "gradient": "direct"}, "gradient 'direct' applies to medgrad"),
])
def test_explain_bad_input(server, params, words):
    r = slicer_post(f"{server.url}/infer/explain?image={first(server, 'chest')}", params)
    assert r.status_code == 422 and words in r.json()["detail"], r.text
    assert_still_serving(server)
