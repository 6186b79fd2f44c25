"""The `negation` train task through a real server: it publishes a text-tuned CLIP, the server
hot-reloads its text tower (image tower untouched), and bad options get a clear refusal."""
import json

import pytest
import requests
import torch

from test_server import phantom_server

from clinlens.models.clip import LazyClip, load_clip, load_text_tower
from clinlens.server import read_multipart, slicer_post, wait_task


def test_text_tower_override_keeps_the_image_tower(bundle, tmp_path):
    import shutil

    tuned = tmp_path / "tuned"
    shutil.copytree(bundle.path, tuned)
    m = load_clip(tuned, device="cpu").model
    with torch.no_grad():
        for p in m.text_model.parameters():
            p.add_(0.01)
    m.save_pretrained(str(tuned))
    fresh = load_clip(bundle.path, device="cpu")
    vision = {k: v.clone() for k, v in fresh.model.vision_model.state_dict().items()}
    before = fresh.encode_texts(["no effusion."]).clone()
    load_text_tower(fresh, tuned)
    assert not torch.allclose(fresh.encode_texts(["no effusion."]), before)
    assert all(torch.equal(v, fresh.model.vision_model.state_dict()[k]) for k, v in vision.items())
    lazy = LazyClip({"clip_model": str(bundle.path)}, device="cpu", text_dir=tuned)
    assert torch.allclose(lazy.get().encode_texts(["no effusion."]), fresh.encode_texts(["no effusion."]))
    from safetensors.torch import save_file

    other = tmp_path / "other"
    other.mkdir()
    save_file({"text_model.embeddings.token_embedding.weight": torch.zeros(7, 3)}, str(other / "model.safetensors"))
    with pytest.raises(ValueError, match="not a text fine-tune"):
        load_text_tower(fresh, other)


@pytest.fixture(scope="module")
def neg_server(tmp_path_factory):
    yield from phantom_server(tmp_path_factory, "neg", n_chest=2, n_derm=0, n_ct=0, labelled_fraction=0.0, seed=5)


def _zeroshot(server, image):
    r = slicer_post(f"{server.url}/infer/zeroshot?image={image}", {"prompts": ["no pleural effusion"]})
    assert r.status_code == 200, r.text
    return {f["finding"]: f["probability"] for f in json.loads(read_multipart(r)["params"].content)["findings"]}


def test_negation_train_task_publishes_and_the_server_reloads_the_text_tower(neg_server):
    image = sorted(requests.get(neg_server.url + "/datastore/?output=all").json()["objects"])[0]
    before = _zeroshot(neg_server, image)
    r = requests.post(f"{neg_server.url}/train/negation", json={"loss": "con2", "steps": 8, "n_images": 48, "batch": 16})
    assert r.status_code == 200, r.text
    st = wait_task(neg_server.url)
    assert st["status"] == "DONE", st
    tuned = neg_server.model_dir / "clip_negation"
    assert (tuned / "model.safetensors").is_file() and (tuned / "negation.json").is_file()
    stats = requests.get(neg_server.url + "/info/").json()["train_stats"]["negation"]
    assert stats["status"] == "DONE" and stats["loss"] == "con2"
    after = _zeroshot(neg_server, image)  # the same image tower, a new text tower: the scores move
    assert set(after) == set(before) and max(abs(after[k] - before[k]) for k in before) > 1e-4, (before, after)


def test_negation_train_task_refuses_a_bad_loss(neg_server):
    """Refused by the server before a training subprocess starts: a 422 naming the option."""
    r = requests.post(f"{neg_server.url}/train/negation", json={"loss": "con3", "steps": 1})
    assert r.status_code == 422 and "'loss' must be one of" in r.json()["detail"], r.text
    r = requests.post(f"{neg_server.url}/train/negation", data='{"steps": Infinity}',  # non-standard JSON that Python's json accepts
                      headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and "'steps' must be a finite number" in r.json()["detail"], r.text
