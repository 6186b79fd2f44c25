"""A short region training run (DeepEdit-style simulated clicks) improves click segmentation and publishes atomically."""
import json

import numpy as np
import pytest
import torch

from clinlens.models.clip import load_clip
from clinlens.models.region_clip import RegionCLIP
from clinlens.models.region_predictor import RegionPredictor
from clinlens.trainers.region_seg import center_click, error_click, phantom_region_examples, train_region
from test_region_model import make_tiny_clip  # noqa: E402  (tests/ is on sys.path under pytest)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _dice(pred, objects):
    scores = []
    for i, (img, m, _) in enumerate(objects):
        p = pred.predict(img, f"obj{i}", fg_xy=[center_click(m)])["mask"]
        scores.append(2 * (p & m).sum() / (p.sum() + m.sum()))
    return float(np.mean(scores))


def test_simulated_clicks_land_in_the_error_regions():
    t = np.zeros((20, 20), bool)
    t[5:15, 5:15] = True
    (x, y), lab = error_click(np.zeros_like(t), t)
    assert lab == 1 and 9 <= x <= 10 and 9 <= y <= 10  # foreground click at the centre of the missed object
    p = t.copy()
    p[0:4, :] = True  # false positive band larger than any false negative
    (x, y), lab = error_click(p, t)
    assert lab == 0 and p[int(y), int(x)] and not t[int(y), int(x)]
    assert error_click(t, t) is None
    x, y = center_click(t, np.random.default_rng(0))
    assert t[int(y), int(x)]


def test_short_training_improves_dice_and_reloads(tmp_path):
    bundle = load_clip(make_tiny_clip(tmp_path / "clip"), device="cpu")
    objects = list(phantom_region_examples(seed=0, n=24, propagation=False))
    assert {c for *_, c in objects} >= {"cardiomegaly", "pleural effusion"} and all(m.any() for _, m, _ in objects)
    torch.manual_seed(0)
    before = _dice(RegionPredictor(RegionCLIP(bundle.model).eval(), bundle), objects)
    out = tmp_path / "clip" / "region.safetensors"
    summary = train_region(bundle, objects, out, steps=150, batch=8, lr=2e-3, seed=0, progress=False, log=lambda *_: None)
    assert summary["steps"] == 150 and np.isfinite(summary["final_loss"])
    pred = RegionPredictor.from_bundle(bundle)  # default location: region.safetensors beside the CLIP
    after = _dice(pred, objects)
    print(f"dice before {before:.3f} after {after:.3f}")
    assert after > before + 0.15 and after > 0.3, (before, after)
    info = json.loads(out.with_suffix(".json").read_text())
    assert info["training"]["steps"] == 150 and info["config"]["k"] == 2
    assert sorted(p.name for p in out.parent.iterdir() if p.name.startswith(".")) == []  # no temp files left


def test_label_examples_give_one_object_per_label_index(tmp_path):
    import SimpleITK as sitk

    from clinlens.trainers.region_seg import label_examples

    vol = np.random.default_rng(0).normal(0, 100, (6, 32, 40)).astype(np.int16)
    lab = np.zeros(vol.shape, np.uint8)
    lab[1:4, 5:15, 5:15] = 1
    lab[2, 20:30, 20:35] = 2
    sitk.WriteImage(sitk.GetImageFromArray(vol), str(tmp_path / "ct.nii.gz"))
    sitk.WriteImage(sitk.GetImageFromArray(lab), str(tmp_path / "ct_label.nii.gz"))
    ex = list(label_examples([tmp_path / "ct.nii.gz"], [tmp_path / "ct_label.nii.gz"], {"nodule": 1, "effusion": 2, "mass": 3}))
    names = [e[2] for e in ex if len(e) == 3]
    assert names.count("nodule") == 3 and names.count("effusion") == 1 and "mass" not in names
    steps = [e for e in ex if len(e) == 4]  # slice propagation: (image, mask, name, neighbour's mask)
    assert [e[2] for e in steps] == ["nodule"]  # the one-slice effusion has no neighbour to propagate from
    _, m, _, prompt = steps[0]
    assert prompt.any() and prompt.shape == m.shape
    img, m, _ = ex[0]
    assert img.shape == (32, 40, 3) and img.dtype == np.float32 and m.shape == (32, 40) and m.sum() == 100


def test_ddp_training_on_two_cpu_ranks_keeps_replicas_in_sync(tmp_path):
    """The multi-GPU path (spawn + DistributedDataParallel), run with gloo on two CPU processes."""
    from clinlens.trainers.region_seg import train_region_ddp

    clip_dir = make_tiny_clip(tmp_path / "clip")
    objects = list(phantom_region_examples(seed=0, n=12, propagation=False))
    out = tmp_path / "ddp" / "region.safetensors"
    summary = train_region_ddp(clip_dir, objects, out, world_size=2, backend="gloo", steps=6, batch=4, seed=0,
                               progress=False)
    assert summary["world_size"] == 2 and summary["replicas_in_sync"] is True and summary["steps"] == 6
    bundle = load_clip(clip_dir, device="cpu")
    loaded = RegionCLIP.load(bundle, out)
    assert json.loads(out.with_suffix(".json").read_text())["training"]["world_size"] == 2
    assert any(not torch.equal(a, b) for a, b in zip(loaded.state_dict().values(),
                                                      RegionCLIP(bundle.model).state_dict().values()))
