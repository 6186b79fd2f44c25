"""Clinician feedback into the datastore: segment-name mapping, schema-checked structured feedback,
and nothing lost under concurrent saves or a save during training (real MONAI Label server)."""
import json
import threading
import time

import numpy as np
import pytest
import requests
import SimpleITK as sitk

from test_server import phantom_server

from clinlens.activelearning.feedback import canonical_name, map_segments, merge_feedback, validate_feedback
from clinlens.data.conventions import RequestError
from clinlens.data.phantoms import DERM_CONCEPTS, DERM_DIAGNOSES
from clinlens.data.studies import LABELS

NAMES = tuple(LABELS) + tuple(DERM_CONCEPTS)


# ----------------------------------------------------------------------------- pure
def test_segment_names_map_onto_the_vocabulary_and_unknown_names_are_kept():
    assert canonical_name("Pleural_Effusion", NAMES) == "pleural effusion"
    assert canonical_name("effusion", NAMES) == "pleural effusion"
    assert canonical_name("Dots/Globules", NAMES) == "dots and globules"
    assert canonical_name("Segment_1", NAMES) is None
    assert canonical_name("nodule and mass", NAMES) is None  # two findings in one name: not guessed
    out = map_segments({2: "Pigment-Network", 1: "Segment_1"}, NAMES)
    assert out["segments"] == [{"idx": 1, "name": "Segment_1", "maps_to": None},
                               {"idx": 2, "name": "Pigment-Network", "maps_to": "pigment network"}]
    assert out["unknown"] == ["Segment_1"]


@pytest.mark.parametrize("payload, words", [
    ({}, "non-empty"), ([1], "non-empty"), ({"colour": 1}, "unknown feedback field"),
    ({"reject_concepts": ["pigment network", "sparkles"]}, "unknown concept"),
    ({"reject_concepts": [3]}, "list of concept names"),
    ({"boxes": [{"box": [0, 0, 500, 10]}]}, "outside the image"),
    ({"boxes": [{"box": [10, 10, 5, 20]}]}, "empty"),
    ({"boxes": [{"box": [0, 0, 5, 5], "polarity": "maybe"}]}, "polarity"),
    ({"boxes": [{"box": [0, 0, float("nan"), 5]}]}, "finite"),
    ({"boxes": {"box": [0, 0, 5, 5]}}, "must be a list"),
    ({"corrected_class": "wart"}, "unknown class"),
    ({"pruned_prototypes": [1, 99]}, "do not exist"),
    ({"pruned_prototypes": ["1"]}, "integer"),
])
def test_bad_feedback_is_refused_with_a_reason(payload, words):
    with pytest.raises(RequestError, match=words):
        validate_feedback(payload, DERM_CONCEPTS, DERM_DIAGNOSES, hw=(200, 300), prototype_ids=range(24))


def test_feedback_normalises_and_merges():
    a = validate_feedback({"reject_concepts": "Streaks", "boxes": [{"box": [0, 0, 10, 10], "polarity": "negative"}],
                           "corrected_class": "Melanoma", "pruned_prototypes": [3, 1, 3]},
                          DERM_CONCEPTS, DERM_DIAGNOSES, hw=(200, 300), prototype_ids=range(24))
    assert a == {"reject_concepts": ["streaks"], "boxes": [{"box": [0.0, 0.0, 10.0, 10.0], "polarity": "negative"}],
                 "corrected_class": "melanoma", "pruned_prototypes": [1, 3]}
    b = merge_feedback(a, {"reject_concepts": ["asymmetry"], "boxes": [{"box": [1, 1, 2, 2], "polarity": "positive"}],
                           "corrected_class": "nevus"})
    assert b["reject_concepts"] == ["asymmetry", "streaks"] and len(b["boxes"]) == 2
    assert b["corrected_class"] == "nevus" and b["pruned_prototypes"] == [1, 3]


# ----------------------------------------------------------------------------- real server
@pytest.fixture(scope="module")
def fb_server(tmp_path_factory):
    yield from phantom_server(tmp_path_factory, "fb", n_chest=2, n_derm=8, n_ct=0, labelled_fraction=0.5, seed=13)


def _ids(server, prefix):
    return sorted(i for i in requests.get(server.url + "/datastore/?output=all").json()["objects"] if i.startswith(prefix))


def _label_file(server, image, name="lab.png"):
    r = requests.get(f"{server.url}/datastore/image", params={"image": image})
    p = server.tmp / f"img_{image}.png"
    p.write_bytes(r.content)
    h, w = sitk.GetArrayFromImage(sitk.ReadImage(str(p))).shape[:2]
    lab = np.zeros((h, w), np.uint8)
    lab[h // 4:h // 2, w // 4:w // 2] = 10
    lab[h // 2:3 * h // 4, w // 2:3 * w // 4] = 2
    out = server.tmp / f"{image}_{name}"
    sitk.WriteImage(sitk.GetImageFromArray(lab), str(out))
    return out, (h, w)


def _save(server, image, path, params):
    return requests.put(f"{server.url}/datastore/label", params={"image": image, "tag": "final"},
                        files={"label": (path.name, path.read_bytes()), "params": (None, json.dumps(params))})


def test_save_label_maps_segment_names_and_stores_feedback(fb_server):
    image = _ids(fb_server, "derm")[-1]
    path, (h, w) = _label_file(fb_server, image)
    params = {"label_info": [{"name": "Pigment_Network", "idx": 10}, {"name": "odd blob", "idx": 2}],
              "feedback": {"reject_concepts": ["streaks"], "corrected_class": "melanoma",
                           "boxes": [{"box": [0, 0, w // 2, h // 2], "polarity": "positive"}]}}
    r = _save(fb_server, image, path, params)
    assert r.status_code == 200, r.text
    res = r.json()
    assert {s["name"]: s["maps_to"] for s in res["segments"]} == {"Pigment_Network": "pigment network", "odd blob": None}
    assert res["unknown_segments"] == ["odd blob"]  # kept and reported
    assert res["feedback"]["corrected_class"] == "melanoma" and res["feedback"]["reject_concepts"] == ["streaks"]
    info = requests.get(f"{fb_server.url}/datastore/label/info", params={"label": image, "tag": "final"}).json()
    assert [d["name"] for d in info["label_info"]] == ["Pigment_Network", "odd blob"]
    img_info = requests.get(f"{fb_server.url}/datastore/image/info", params={"image": image}).json()
    assert img_info["feedback"]["boxes"][0]["polarity"] == "positive"


@pytest.mark.parametrize("feedback, words", [({"reject_concepts": ["sparkles"]}, "unknown concept"),
                                             ({"boxes": [{"box": [0, 0, 99999, 5]}]}, "outside the image"),
                                             ({"pruned_prototypes": [12345]}, "do not exist")])
def test_bad_feedback_is_a_4xx_and_changes_nothing(fb_server, feedback, words):
    image = _ids(fb_server, "derm")[0]
    before = requests.get(f"{fb_server.url}/datastore/?output=all").json()["objects"][image]
    path, _ = _label_file(fb_server, image, "bad.png")
    r = _save(fb_server, image, path, {"label_info": [{"name": "lesion", "idx": 10}], "feedback": feedback})
    assert r.status_code == 422 and words in r.json()["detail"], r.text
    r = requests.put(f"{fb_server.url}/feedback", params={"image": image}, json=feedback)
    assert r.status_code == 422 and words in r.json()["detail"], r.text
    assert requests.get(f"{fb_server.url}/datastore/?output=all").json()["objects"][image] == before


def test_feedback_endpoint_accumulates(fb_server):
    image = _ids(fb_server, "derm")[1]
    r1 = requests.put(f"{fb_server.url}/feedback", params={"image": image}, json={"reject_concepts": ["asymmetry"]})
    r2 = requests.put(f"{fb_server.url}/feedback", params={"image": image},
                      json={"reject_concepts": ["streaks"], "pruned_prototypes": [0]})
    assert r1.status_code == 200 and r2.status_code == 200, (r1.text, r2.text)
    assert r2.json()["feedback"] == {"reject_concepts": ["asymmetry", "streaks"], "pruned_prototypes": [0]}
    assert requests.put(f"{fb_server.url}/feedback", params={"image": "nope"}, json={"reject_concepts": []}).status_code == 404


def test_concurrent_saves_and_a_save_during_training_lose_nothing(fb_server):
    derm = _ids(fb_server, "derm")
    files = {i: _label_file(fb_server, i, "conc.png")[0] for i in derm}
    saved = {}

    def save(i, k):
        r = _save(fb_server, i, files[i], {"label_info": [{"name": "pigment network", "idx": 10}],
                                           "feedback": {"reject_concepts": [DERM_CONCEPTS[k % len(DERM_CONCEPTS)]]}})
        saved.setdefault(i, []).append((k, r.status_code))

    r = requests.post(f"{fb_server.url}/train/concepts", json={"steps": 20})
    assert r.status_code == 200, r.text
    # the training subprocess starts, reads and writes the datastore while saves keep arriving:
    # rounds of concurrent saves (one thread per image) until it is done
    k, deadline = 0, time.time() + 600
    while time.time() < deadline:
        threads = [threading.Thread(target=save, args=(i, k)) for i in derm]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        k += 1
        st = requests.get(f"{fb_server.url}/train/").json()
        if st.get("status") in ("DONE", "ERROR"):
            break
    assert st.get("status") == "DONE", st
    assert k >= 2 and all(code == 200 for v in saved.values() for _, code in v), saved
    want = sorted({DERM_CONCEPTS[j % len(DERM_CONCEPTS)] for j in range(k)})
    for objects in (requests.get(f"{fb_server.url}/datastore/?output=all").json()["objects"],
                    json.loads((fb_server.studies / "datastore_v2.json").read_text())["objects"]):
        for i in derm:
            final = objects[i]["labels"]["final"]
            assert final["info"]["segments"]["segments"][0]["maps_to"] == "pigment network"
            assert objects[i]["image"]["info"]["feedback"]["reject_concepts"] == want, i  # every save kept
