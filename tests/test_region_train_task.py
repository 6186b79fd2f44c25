"""The `region_seg` train task improves a model from the datastore's saved labels.

A server starts with a fresh (untrained) region model; Dice of one click per labelled object is
measured over HTTP, `POST /train/region_seg` runs MONAI Label's training subprocess, the
published model is hot-reloaded, and the same clicks must now segment clearly better.
"""
import json

import numpy as np
import pytest
import requests
import SimpleITK as sitk

from clinlens.models.clip import load_clip
from clinlens.server import read_multipart, wait_task
from clinlens.models.region_clip import RegionCLIP


@pytest.fixture(scope="module")
def fresh_server(tmp_path_factory):
    from clinlens.data.studies import make_studies
    from clinlens.server import Server

    root = tmp_path_factory.mktemp("train_studies")
    # chest findings: compact objects a single click can name (derm concept maps are scattered)
    make_studies(root, n_chest=6, n_derm=0, n_ct=0, labelled_fraction=1.0, seed=11, chest_size=256, progress=False)
    model_dir = tmp_path_factory.mktemp("train_model")
    import torch

    torch.manual_seed(0)
    RegionCLIP(load_clip(device="cpu").model, k=2).save(model_dir / "region.safetensors")
    with Server(root, log_path=model_dir / "server.log", conf={"model_dir": model_dir}) as s:
        s.studies, s.model_dir, s.tmp = root, model_dir, tmp_path_factory.mktemp("client_train")
        yield s


def objects(studies):
    out = []
    for rec in json.loads((studies / "clinlens" / "index.json").read_text())["images"]:
        t = json.loads((studies / "clinlens" / f"{rec['id']}.json").read_text())
        lab = sitk.GetArrayFromImage(sitk.ReadImage(str(studies / rec["label"])))
        for name, idx in t["labels"].items():
            m = lab == idx
            if m.sum() >= 30:
                out.append((rec["id"], name, m))
    return out


def mean_dice(server):
    scores = []
    for image, name, m in objects(server.studies):
        ys, xs = np.nonzero(m)
        c = int(np.argmin((xs - xs.mean()) ** 2 + (ys - ys.mean()) ** 2))
        r = requests.post(f"{server.url}/infer/region_seg?image={image}",
                          files={"params": (None, json.dumps({"foreground": [[int(xs[c]), int(ys[c])]], "label": name}))})
        assert r.status_code == 200, r.text
        p = server.tmp / "m.png"
        p.write_bytes(read_multipart(r)["image"].content)
        pred = sitk.GetArrayFromImage(sitk.ReadImage(str(p))) > 0
        scores.append(2 * (pred & m).sum() / max(pred.sum() + m.sum(), 1))
    return float(np.mean(scores)), len(scores)


def test_training_from_saved_labels_improves_dice_and_hot_reloads(fresh_server):
    before, n = mean_dice(fresh_server)
    mtime = (fresh_server.model_dir / "region.safetensors").stat().st_mtime
    for bad, words in (({"steps": 0}, "'steps' must be in [1, inf]"), ({"device": "tpu"}, "'device' must be cpu or cuda"),
                       ({"lr": "fast"}, "'lr' must be a number")):  # refused before a training subprocess starts
        r = requests.post(f"{fresh_server.url}/train/region_seg", json=bad)
        assert r.status_code == 422 and words in r.json()["detail"], r.text
    r = requests.post(f"{fresh_server.url}/train/region_seg", json={"steps": 150, "batch": 8, "lr": 3e-3, "device": "cpu"})
    assert r.status_code == 200, r.text
    st = wait_task(fresh_server.url)
    assert st["status"] == "DONE", st
    assert (fresh_server.model_dir / "region.safetensors").stat().st_mtime > mtime  # republished
    stats = requests.get(f"{fresh_server.url}/info/").json()["train_stats"]["region_seg"]
    assert stats["status"] == "DONE" and stats["objects"] >= n
    after, _ = mean_dice(fresh_server)
    assert after > before + 0.1, (before, after)
