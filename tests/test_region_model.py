"""MedP-CLIP region model: prompt encoder, zero-init fusion, region attention, trunk cache, windows, checkpoints."""
import os

import numpy as np
import pytest
import torch

from clinlens.models.prompt_encoder import PromptEncoder
from clinlens.models.region_clip import RegionCLIP, region_path
from clinlens.models.region_predictor import RegionPredictor, focus_window

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_tiny_clip(d):
    """The default CLIP's shape (`small_clip_config`: 14x14 patch grid, width 128, 6 layers), random weights."""
    from transformers import CLIPModel

    from clinlens.data.pairs import REGION_TEMPLATES
    from clinlens.data.phantoms import CHEST_FINDINGS, CT_FINDINGS, DERM_CONCEPTS, DERM_DIAGNOSES
    from clinlens.models.clip import small_clip_config
    from clinlens.text.tokenizer import EOT, PAD, SOT, build_tokenizer

    words = CHEST_FINDINGS + CT_FINDINGS + DERM_CONCEPTS + DERM_DIAGNOSES
    tok = build_tokenizer([t.format(w) for w in words for t in REGION_TEMPLATES], d)
    ids = {t: tok.convert_tokens_to_ids(t) for t in (PAD, SOT, EOT)}
    torch.manual_seed(0)
    CLIPModel(small_clip_config(len(tok), ids[PAD], ids[SOT], ids[EOT])).save_pretrained(str(d))
    return d


@pytest.fixture(scope="module")
def model(bundle):
    torch.manual_seed(1)
    return RegionCLIP(bundle.model, k=2).eval()


def _randomise(m, seed=2):
    """Move the region parts off their initialisation (incl. the zero-init fusion) so tests see real paths."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    return m


def test_prompt_encoder_shapes_order_and_labels():
    torch.manual_seed(0)
    pe = PromptEncoder(32, (14, 14), (112, 112))
    pts = torch.tensor([[[100.0, 10.0], [20.0, 90.0], [0.0, 0.0]], [[50.0, 50.0], [60.0, 60.0], [5.0, 5.0]]])
    lab = torch.tensor([[1, 0, -1], [1, 1, 0]])
    boxes = torch.tensor([[16.0 - 0.5, 32.0 - 0.5, 48.0 - 0.5, 64.0 - 0.5], [float("nan")] * 4])
    mask = torch.zeros(2, 1, 56, 56)
    mask[0, 0, :28, :28] = 1
    mask[1] = float("nan")
    sparse, dense, region = pe(pts, lab, boxes, mask)
    assert sparse.shape == (2, 5, 32) and dense.shape == (2, 32, 14, 14) and region.shape == (2, 196)
    nap = pe.not_a_point.weight[0]
    assert torch.allclose(sparse[0, 2], nap) and torch.allclose(sparse[1, 3], nap) and torch.allclose(sparse[1, 4], nap)
    assert not torch.allclose(sparse[0, 3], nap)  # a present box gives corner tokens
    # point order is kept, and the label changes the token
    s2, _, _ = pe(pts[:, [1, 0, 2]], lab[:, [1, 0, 2]])
    assert torch.allclose(s2[0, 0], sparse[0, 1]) and torch.allclose(s2[0, 1], sparse[0, 0])
    s3, _, _ = pe(pts, torch.tensor([[0, 0, -1], [1, 1, 0]]))
    assert not torch.allclose(s3[0, 0], sparse[0, 0]) and torch.allclose(s3[0, 1], sparse[0, 1])
    # an absent mask is the learned "no mask" embedding
    assert torch.allclose(dense[1], pe.no_mask.weight.view(-1, 1, 1).expand(-1, 14, 14))
    assert not torch.allclose(dense[0], dense[1])
    # region map: (x=100, y=10) -> column 12, row 1 (x then y); box [16, 32, 48, 64) -> cols 2..5, rows 4..7
    r = pe.region_map(pts[:1, :1], lab[:1, :1]).view(14, 14)
    assert tuple(np.unravel_index(int(r.argmax()), (14, 14))) == (1, 12)
    rb = pe.region_map(boxes=boxes).view(2, 14, 14)
    assert torch.allclose(rb[0, 4:8, 2:6], torch.ones(4, 4)) and abs(float(rb[0].sum()) - 16) < 1e-4
    assert torch.equal(rb[1], torch.ones(14, 14))  # nothing localises -> the whole image
    bg_only = pe.region_map(pts[:1, 1:2], lab[:1, 1:2])  # a background click alone does not localise
    assert torch.equal(bg_only, torch.ones_like(bg_only))
    rm = pe.region_map(mask_prompt=mask[:1]).view(14, 14)
    assert rm[:7, :7].min() == 1 and rm[7:].max() == 0


def test_zero_init_global_path_is_the_plain_clip(bundle, model):
    x = bundle.pixel_values(np.random.default_rng(0).random((2, 112, 112, 3)))
    pts = torch.tensor([[[30.0, 40.0]], [[80.0, 20.0]]])
    with torch.no_grad():
        ref = bundle.encode_images(x)
        out = model(x, pts, torch.ones(2, 1, dtype=torch.long), torch.tensor([[10.0, 10, 60, 60]] * 2),
                    torch.rand(2, 1, 56, 56))
    assert out["mask_logits"].shape == (2, 1, 56, 56)
    assert out["global_embedding"].shape == out["region_embedding"].shape == (2, 128)
    assert torch.allclose(out["global_embedding"], ref, atol=1e-5)
    assert torch.allclose(out["region_embedding"].norm(dim=-1), torch.ones(2), atol=1e-5)


def test_region_cls_attends_inside_and_nobody_attends_to_it(bundle):
    torch.manual_seed(3)
    m = _randomise(RegionCLIP(bundle.model, k=1, eps=1e-6)).eval()
    e = m.image_size / 14  # patch size: the box covers patch rows/columns 4..7 of the 14x14 grid
    box = torch.tensor([[4 * e - 0.5, 4 * e - 0.5, 8 * e - 0.5, 8 * e - 0.5]])
    bias = m.attention_bias(m.prompt_encoder.region_map(boxes=box))
    t = bias.shape[-1]
    assert bias.shape == (1, 4, t, t) and t == 198
    assert (bias[0, :, : t - 1, t - 1] <= -1e4).all() and (bias[0, :, : t - 1, : t - 1] == 0).all()
    inside = bias[0, 0, t - 1, 1:-1].view(14, 14)
    assert inside[4:8, 4:8].abs().max() < 1e-3 and inside[0].max() < -10  # outside the box: log(eps)
    # functional: a huge region [CLS] offset changes neither the global embedding nor the mask
    x = bundle.pixel_values(np.random.default_rng(1).random((1, 112, 112, 3)))
    with torch.no_grad():
        h = m.trunk(x)
        a = m.forward_from_trunk(h, boxes=box)
        m.region_offset.add_(5.0)
        b = m.forward_from_trunk(h, boxes=box)
        m.region_offset.sub_(5.0)
        # changing tokens far outside the box moves the global embedding, hardly the region one
        h2 = h.clone()
        grid = h2[:, 1:].view(1, 14, 14, -1)
        grid[:, 10:, 10:] += 3 * torch.randn_like(grid[:, 10:, 10:])
        c = m.forward_from_trunk(h2, boxes=box)
    assert torch.allclose(a["global_embedding"], b["global_embedding"], atol=1e-6)
    assert torch.allclose(a["mask_logits"], b["mask_logits"], atol=1e-5)
    assert not torch.allclose(a["region_embedding"], b["region_embedding"])
    d_glob = (a["global_embedding"] - c["global_embedding"]).norm()
    d_reg = (a["region_embedding"] - c["region_embedding"]).norm()
    assert d_glob > 0.005 and d_reg < 0.01 * d_glob


def test_focus_window_rules():
    assert focus_window((256, 256), [(100, 100)]) == (53, 53, 149, 149)  # min side 96 round the click
    assert focus_window((256, 256), [(2, 250)]) == (0, 160, 96, 256)  # shifted inside the image
    assert focus_window((256, 256), box=[100, 100, 140, 120]) == (70, 60, 170, 160)  # box x2.5
    x0, y0, x1, y1 = focus_window((50, 80), [(10, 10)])  # image smaller than the window: centred, padded
    assert (x1 - x0, y1 - y0) == (80, 80) and x0 == 0 and y0 == -15


def test_predict_non_square_and_trunk_cache(bundle, model, tmp_path):
    path = model.save(tmp_path / "region.safetensors")
    pred = RegionPredictor.from_bundle(bundle, path, max_grow=0)
    img = np.random.default_rng(0).random((300, 500, 3)).astype(np.float32)
    r = pred.predict(img, "img-a", fg_xy=[(450, 40)])
    assert r["mask"].shape == r["prob"].shape == (300, 500) and r["mask"].dtype == bool
    x0, y0, x1, y1 = r["window"]
    assert x0 <= 450 < x1 and y0 <= 40 < y1 and x1 - x0 == y1 - y0 == 96 and x1 <= 500 and y0 >= 0
    assert r["region_embedding"].shape == (128,) and not r["cached"]
    assert pred.stats["trunk"] == 1 and r["timings_ms"]["trunk"] > 0
    # follow-up click inside the window: trunk reused, only prompt encoder + fusion + decoder run
    r2 = pred.predict(img, "img-a", fg_xy=[(450, 40)], bg_xy=[(420, 60)])
    assert r2["cached"] and r2["window"] == r["window"] and pred.stats["trunk"] == 1 and pred.stats["click"] == 2
    assert r2["timings_ms"]["trunk"] == 0
    # a click outside the window, another image, another slice: misses
    assert not pred.predict(img, "img-a", fg_xy=[(50, 250)])["cached"]
    assert not pred.predict(img, "img-b", fg_xy=[(450, 40)])["cached"]
    assert not pred.predict(img, "img-a", fg_xy=[(450, 40)], slice=3)["cached"]
    assert pred.stats["trunk"] == 4
    assert pred.predict(img, "img-a", fg_xy=[(450, 40)])["cached"]
    # a republished model file invalidates the cache and is reloaded
    _randomise(RegionCLIP.load(bundle, path)).save(path)
    st = os.stat(path)
    os.utime(path, (st.st_atime, st.st_mtime + 5))
    r3 = pred.predict(img, "img-a", fg_xy=[(450, 40)])
    assert not r3["cached"] and pred.stats["reloads"] == 1
    assert not np.allclose(r3["region_embedding"], r["region_embedding"])


def test_cache_is_bounded_lru(bundle, model):
    pred = RegionPredictor(model, bundle, cache_size=3, max_grow=0)
    img = np.zeros((128, 128, 3), np.float32)
    for k in range(5):
        pred.predict(img, f"k{k}", fg_xy=[(64, 64)])
    assert len(pred._cache) == 3 and pred.stats["trunk"] == 5
    assert pred.predict(img, "k4", fg_xy=[(64, 64)])["cached"]
    assert not pred.predict(img, "k0", fg_xy=[(64, 64)])["cached"]


def test_save_load_round_trip_is_identical(bundle, tmp_path):
    torch.manual_seed(4)
    m = _randomise(RegionCLIP(bundle.model, k=3, dim=64)).eval()
    path = m.save(tmp_path / "sub" / "region.safetensors", extra={"note": "x"})
    assert path.is_file() and path.with_suffix(".json").is_file()
    assert sorted(p.name for p in path.parent.iterdir()) == ["region.json", "region.safetensors"]  # no temp files
    m2 = RegionCLIP.load(bundle, path)
    assert m2.k == 3 and m2.config == m.config
    x = bundle.pixel_values(np.random.default_rng(2).random((1, 112, 112, 3)))
    args = (torch.tensor([[[40.0, 50.0], [90, 90]]]), torch.tensor([[1, 0]]), torch.tensor([[20.0, 20, 70, 80]]))
    with torch.no_grad():
        a, b = m(x, *args), m2(x, *args)
    for k in ("global_embedding", "region_embedding", "mask_logits", "iou_pred"):
        assert torch.equal(a[k], b[k]), k
    assert region_path(bundle.path) == bundle.path / "region.safetensors"
    with pytest.raises(FileNotFoundError):
        RegionCLIP.load(bundle, tmp_path / "missing.safetensors")


def test_propagate_and_predict_3d_shapes(bundle, model):
    pred = RegionPredictor(model, bundle)
    vol = np.random.default_rng(3).random((5, 64, 80)).astype(np.float32)
    fn = lambda z: np.repeat(vol[z][..., None], 3, -1)  # noqa: E731
    start = np.zeros((64, 80), bool)
    start[20:40, 30:50] = True
    out = pred.propagate_3d(fn, 5, 2, start, "vol")
    assert out.shape == (5, 64, 80) and out.dtype == bool and (out[2] == start).all()
    res = pred.predict_3d(fn, 5, "vol", fg_xyz=[(40, 30, 1)], bg_xyz=[(5, 5, 1)], box=[25, 15, 0, 55, 45, 4])
    assert res["mask"].shape == (5, 64, 80) and res["seeds"] == [1] and not res["mask"][4].any()


def test_window_grows_for_an_object_larger_than_the_first_window():
    """One click on a large dermoscopy lesion: the shipped model's mask must not be cut at the window edge."""
    from clinlens.data.image_io import to_unit_rgb
    from clinlens.data.phantoms import make_derm
    from clinlens.models.clip import load_clip

    s = make_derm(70_000_123, size=256)
    lesion = s.masks["lesion"]
    ys, xs = np.nonzero(lesion)
    click = [(float(np.median(xs)), float(np.median(ys)))]
    default = load_clip(device="cpu")
    fixed = RegionPredictor.from_bundle(default, max_grow=0).predict(to_unit_rgb(s.image), "d", fg_xy=click)
    grown = RegionPredictor.from_bundle(default).predict(to_unit_rgb(s.image), "d", fg_xy=click)
    dice = lambda m: 2 * (m & lesion).sum() / (m.sum() + lesion.sum())  # noqa: E731
    side = lambda w: w[2] - w[0]  # noqa: E731
    if side(fixed["window"]) < lesion.any(0).sum():  # the lesion is wider than the first window
        assert side(grown["window"]) > side(fixed["window"])
        assert dice(grown["mask"]) > dice(fixed["mask"])
    assert dice(grown["mask"]) > 0.6


def test_background_click_on_another_slice_corrects_the_3d_mask():
    """3D correction: a background click on a slice with no foreground click removes the mask there and
    the slices it owns are re-propagated from the corrected mask (the shipped model on a held-out CT)."""
    from clinlens.data.image_io import to_unit_rgb
    from clinlens.data.phantoms import make_ct
    from clinlens.models.clip import load_clip

    s = make_ct(70_000_321, shape=(40, 128, 128), findings=["lung mass"])
    m3 = s.masks["lung mass"]
    fn = lambda z: to_unit_rgb(s.image[z])  # noqa: E731
    z0 = int(np.argmax(m3.sum(axis=(1, 2))))
    ys, xs = np.nonzero(m3[z0])
    click = (float(np.median(xs)), float(np.median(ys)), float(z0))
    pred = RegionPredictor.from_bundle(load_clip(device="cpu"))
    one = pred.predict_3d(fn, len(m3), "ct", fg_xyz=[click])
    zs = np.flatnonzero(one["mask"].any(axis=(1, 2)))
    assert len(zs) > 1 and one["mask"][z0, int(click[1]), int(click[0])]
    zb = int(zs.max())  # the top slice the mass reached: the clinician says "not here"
    yb, xb = (int(v) for v in np.argwhere(one["mask"][zb]).mean(0).round())
    if not one["mask"][zb, yb, xb]:
        yb, xb = (int(v) for v in np.argwhere(one["mask"][zb])[0])
    two = pred.predict_3d(fn, len(m3), "ct", fg_xyz=[click], bg_xyz=[(xb, yb, zb)])
    assert two["seeds"] == [z0] and two["refined"] == [zb]
    assert not two["mask"][zb, yb, xb]
    assert two["mask"][zb].sum() < one["mask"][zb].sum()
    np.testing.assert_array_equal(two["mask"][: (z0 + zb) // 2 + 1], one["mask"][: (z0 + zb) // 2 + 1])
