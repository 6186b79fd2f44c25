"""The active-learning loop over a real MONAI Label server: background scoring, strategies, next
sample, infer, Save Label with feedback, automatic background training, hot reload, and an infer
that moved towards the saved label."""
import json
import time

import numpy as np
import pytest
import requests
import SimpleITK as sitk

from test_server import phantom_server

from clinlens.server import read_multipart, slicer_post, wait_task

STRATEGIES = ("random", "uncertainty", "ambiguity", "diversity", "hybrid")
SCORING = ("concept_ambiguity", "diversity", "region_uncertainty")


@pytest.fixture(scope="module")
def al_server(tmp_path_factory):
    yield from phantom_server(tmp_path_factory, "al", {"auto_train_after": 1, "auto_train_models": "concepts"},
                              n_chest=0, n_derm=8, n_ct=0, labelled_fraction=0.25, seed=21)


def _objects(server):
    return requests.get(f"{server.url}/datastore/?output=all").json()["objects"]


def _concepts(server, image) -> dict:
    r = slicer_post(f"{server.url}/infer/concepts?image={image}", {})
    assert r.status_code == 200, r.text
    res = json.loads(read_multipart(r)["params"].content)
    return {c["class"]: c["probability"] for c in res["classes"]}


def test_info_lists_strategies_and_scoring(al_server):
    info = requests.get(al_server.url + "/info/").json()
    assert set(STRATEGIES) <= set(info["strategies"]) and set(SCORING) <= set(info["scoring"])
    assert "config" not in info  # monailabel.md: no top-level config in /info


def test_the_active_learning_loop(al_server):
    srv = al_server
    labelled = {i for i, o in _objects(srv).items() if "final" in o["labels"]}
    # the labelled images carry their class, as a radiologist's earlier work would
    for i in labelled:
        dx = json.loads((srv.studies / "clinlens" / f"{i}.json").read_text())["diagnosis"]
        assert requests.put(f"{srv.url}/datastore/image/info", params={"image": i},
                            data={"info": json.dumps({"diagnosis": dx})}).status_code == 200

    # 1. scoring in the background (MONAI Label's subprocess), values land in the image info
    for m in SCORING:
        assert requests.post(f"{srv.url}/scoring/{m}").status_code == 200
        assert wait_task(srv.url, "scoring")["status"] == "DONE", m
    objects = _objects(srv)
    unl = sorted(set(objects) - labelled)
    infos = {i: objects[i]["image"]["info"] for i in objects}
    for i in unl:
        assert 0 <= infos[i]["concept_margin"] <= 1 and 0 <= infos[i]["region_uncertainty"] <= 1
        assert len(infos[i]["clip_embedding"]) > 8
    assert all("concept_margin" not in infos[i] for i in labelled)  # only unlabelled images are scored

    # 2. strategies pick unlabelled images by their stored scores
    picks = {}
    for s in STRATEGIES:
        r = requests.post(f"{srv.url}/activelearning/{s}", json={})
        assert r.status_code == 200, r.text
        picks[s] = r.json()["id"]
        assert picks[s] in unl, (s, picks[s])
    assert picks["ambiguity"] == min(unl, key=lambda i: infos[i]["concept_margin"])
    assert picks["uncertainty"] == max(unl, key=lambda i: infos[i]["region_uncertainty"])

    # 3. infer on the next sample, 4. save a final label with a corrected class
    image = picks["ambiguity"]
    before = _concepts(srv, image)
    target = min(before, key=before.get)  # the clinician corrects to the class the model finds least likely
    r = requests.get(f"{srv.url}/datastore/image", params={"image": image})
    (srv.tmp / "img.png").write_bytes(r.content)
    h, w = sitk.GetArrayFromImage(sitk.ReadImage(str(srv.tmp / "img.png"))).shape[:2]
    lab = np.zeros((h, w), np.uint8)
    lab[h // 3:2 * h // 3, w // 3:2 * w // 3] = 10
    sitk.WriteImage(sitk.GetImageFromArray(lab), str(srv.tmp / "lab.png"))
    mtime0 = {p.name: p.stat().st_mtime for p in srv.model_dir.glob("csr_*.safetensors")}
    r = requests.put(f"{srv.url}/datastore/label", params={"image": image, "tag": "final"},
                     files={"label": ("lab.png", (srv.tmp / "lab.png").read_bytes()),
                            "params": (None, json.dumps({"label_info": [{"name": "Pigment Network", "idx": 10}],
                                                         "feedback": {"corrected_class": target}}))})
    assert r.status_code == 200, r.text
    assert r.json()["auto_train"] == ["concepts"]  # auto_train_after 1: the save started training

    # 5. the background training reaches DONE and says so in /info train_stats
    st = wait_task(srv.url)
    assert st["status"] == "DONE", st
    stats = requests.get(srv.url + "/info/").json()["train_stats"]["concepts"]
    assert stats["status"] == "DONE" and "derm" in stats["families"]

    # 6. the published model is reloaded and infer moved towards the saved label
    derm = srv.model_dir / "csr_derm.safetensors"
    assert derm.is_file() and derm.stat().st_mtime > mtime0.get(derm.name, 0)
    after = _concepts(srv, image)
    assert after[target] > before[target] + 0.05, (target, before, after)


def test_a_training_killed_midway_leaves_the_last_good_model_serving(al_server):
    import hashlib

    srv = al_server
    image = sorted(_objects(srv))[0]
    published = sorted(srv.model_dir.glob("csr_*.safetensors"))
    digest = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in published}
    before = _concepts(srv, image)
    assert requests.post(f"{srv.url}/train/concepts", json={"steps": 200000}).status_code == 200
    deadline = time.time() + 120
    while time.time() < deadline and "drawn regions, features" not in requests.get(f"{srv.url}/logs/?lines=200").text:
        time.sleep(1)  # until the subprocess is inside its training loop
    # it shows its progress in /info (the keys Slicer's progress bar reads) while it trains
    stats, until = {}, time.time() + 60
    while time.time() < until and not stats.get("epoch"):
        stats = requests.get(srv.url + "/info/").json()["train_stats"]["concepts"]
        time.sleep(0.5)
    assert stats.get("status") == "RUNNING" and stats["total_epochs"] == 200000 and 1 <= stats["epoch"] < 200000, stats
    assert "total_time" not in stats and stats["family"] in ("derm", "chest", "ct")
    requests.delete(f"{srv.url}/train/")
    st = wait_task(srv.url, timeout=120)
    assert st["status"] in ("STOPPED", "ERROR", "DONE") and st["status"] != "DONE", st
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in published} == digest
    assert not list(srv.model_dir.glob(".*.tmp"))  # no half-written file left behind
    assert _concepts(srv, image) == before
