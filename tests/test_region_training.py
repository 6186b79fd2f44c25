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


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Small ops on 2 cores shared with other torch processes: 2 OpenMP threads ran 5-20x slower."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


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
    objects = list(phantom_region_examples(seed=0, n=24))
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
    names = [c for *_, c in ex]
    assert names.count("nodule") == 3 and names.count("effusion") == 1 and "mass" not in names
    img, m, _ = ex[0]
    assert img.shape == (32, 40, 3) and img.dtype == np.float32 and m.shape == (32, 40) and m.sum() == 100
