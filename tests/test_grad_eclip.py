"""Grad-ECLIP / MedGrad explanations (methods.md §4) on the tiny random CLIP (4 heads, 14x14 grid)."""
import copy
import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clinlens.explain.grad_eclip import (
    clear_entropy_cache, effective_radius, entropy_weights, explain, explain_volume, last_block, local_entropy,
    recompute_attention, resolve_target, word_importance,
)
from clinlens.text.tokenizer import words

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _image(seed=0, size=224):
    """A smooth background with a bright blob: some structure for the random CLIP to respond to."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size
    img = 0.3 + 0.2 * np.sin(6 * xx + 3 * yy + seed) + 0.05 * rng.standard_normal((size, size))
    cy, cx = rng.uniform(0.25, 0.75, 2)
    img += 0.4 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 0.01)
    return np.clip(img, 0, 1).astype(np.float32)


def _pv(bundle, img):
    return bundle.pixel_values(np.repeat(img[..., None], 3, -1))


def _reference_map(lb):
    """(E5) written out block by block from a capture: the ReLU of the summed signed contributions (4 heads of 32)."""
    per = []
    for p, gr in zip(lb.probes, lb.grads):
        c = torch.einsum("bhd,bhnd->bhn", gr.view(1, 4, 32), p.v[:, :, 1:])
        qn, kn = F.normalize(p.q[:, :, 0], dim=-1), F.normalize(p.k[:, :, 1:], dim=-1)
        cs = torch.einsum("bhd,bhnd->bhn", qn, kn)
        lo, hi = cs.amin(-1, keepdim=True), cs.amax(-1, keepdim=True)
        per.append((c * (cs - lo) / (hi - lo)).sum(1))
    return F.relu(sum(per))[0]


@pytest.fixture(scope="module")
def pv(bundle):
    return _pv(bundle, _image())


@pytest.fixture(scope="module")
def target(bundle):
    return resolve_target(bundle, "nodule")


@pytest.fixture(scope="module")
def sharp(bundle):
    """A copy whose last block attends sharply (q, k scaled up): at random init attention is nearly uniform,
    so a single-head recomputation would be almost the same pass and hide the difference."""
    model = copy.deepcopy(bundle.model)
    a = model.vision_model.encoder.layers[-1].self_attn
    with torch.no_grad():
        for lin in (a.q_proj, a.k_proj):
            lin.weight.mul_(6)
    return dataclasses.replace(bundle, model=model, _text_cache={})


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_recomputed_multihead_attention_equals_module_output(bundle, pv, target, impl):
    model = bundle.model
    old = model.config._attn_implementation
    model.set_attn_implementation(impl)
    try:
        lb = last_block(bundle, pv, target.embedding)
    finally:
        model.set_attn_implementation(old)
    p = lb.probe
    assert p.heads == 4 and p.q.shape == (1, 4, 197, 32)
    o, out, attn = recompute_attention(p)
    # the captured per-head q, k, v rebuild exactly what entered out_proj and what the module returned
    torch.testing.assert_close(o, p.o.float(), atol=1e-5, rtol=0)
    torch.testing.assert_close(out, p.out.float(), atol=1e-5, rtol=0)
    torch.testing.assert_close(attn.sum(-1), torch.ones(1, 4, 197), atol=1e-5, rtol=0)
    # and the captured pass is the model's ordinary forward: same embedding and cosine
    with torch.no_grad():
        emb = bundle.encode_images(pv)
    torch.testing.assert_close(lb.embedding, emb, atol=1e-5, rtol=0)
    torch.testing.assert_close(lb.cosine, emb @ target.embedding, atol=1e-5, rtol=0)


def test_channel_weights_are_the_gradient_of_the_cosine(bundle, pv, target):
    lb = last_block(bundle, pv, target.embedding)
    # independent forward: the vision tower written out, the attention output a leaf to differentiate
    model = bundle.model
    vm = model.vision_model
    layer = vm.encoder.layers[-1]
    a = layer.self_attn
    with torch.no_grad():
        x = vm.pre_layrnorm(vm.embeddings(pv))
        for blk in vm.encoder.layers[:-1]:
            x = blk(x, None)
        h = layer.layer_norm1(x)
        heads = [t(h).view(1, -1, 4, 32).transpose(1, 2) for t in (a.q_proj, a.k_proj, a.v_proj)]
        o = ((heads[0] @ heads[1].transpose(-1, -2)) / 32 ** 0.5).softmax(-1) @ heads[2]
        o = o.transpose(1, 2).reshape(1, -1, 128)
    o.requires_grad_(True)
    y = x + a.out_proj(o)
    y = y + layer.mlp(layer.layer_norm2(y))
    s = F.normalize(model.visual_projection(vm.post_layernorm(y[:, 0])), dim=-1) @ target.embedding
    g = torch.autograd.grad(s.sum(), o)[0][:, 0]
    torch.testing.assert_close(lb.grad, g, atol=1e-6, rtol=1e-4)
    assert g.abs().max() > 0
    # a finite difference along the gradient agrees too (first order)
    eps = 1e-2
    d = g / g.norm()
    with torch.no_grad():
        o2 = o.clone()
        o2[:, 0] += eps * d
        y2 = x + a.out_proj(o2)
        y2 = y2 + layer.mlp(layer.layer_norm2(y2))
        s2 = F.normalize(model.visual_projection(vm.post_layernorm(y2[:, 0])), dim=-1) @ target.embedding
    assert abs(float(s2 - s.detach()) / eps - float(g.norm())) < 0.05 * float(g.norm())


def test_all_blocks_sum_each_blocks_own_gradient_and_weights(bundle, pv, target):
    vm = bundle.model.vision_model
    n = len(vm.encoder.layers)
    assert n >= 2
    one, every = last_block(bundle, pv, target.embedding), last_block(bundle, pv, target.embedding, blocks=n)
    assert len(every.probes) == n and every.probe.layer is vm.encoder.layers[-1]
    torch.testing.assert_close(every.grad, one.grad, atol=1e-6, rtol=1e-5)  # hooks earlier on change nothing
    torch.testing.assert_close(every.cosine, one.cosine, atol=1e-6, rtol=0)
    # the first block's gradient from an independent forward: its attention output a leaf, the rest written out
    layer, a = vm.encoder.layers[0], vm.encoder.layers[0].self_attn
    with torch.no_grad():
        x = vm.pre_layrnorm(vm.embeddings(pv))
        h = layer.layer_norm1(x)
        heads = [t(h).view(1, -1, 4, 32).transpose(1, 2) for t in (a.q_proj, a.k_proj, a.v_proj)]
        o = (((heads[0] @ heads[1].transpose(-1, -2)) / 32 ** 0.5).softmax(-1) @ heads[2]).transpose(1, 2).reshape(1, -1, 128)
    o.requires_grad_(True)
    y = x + a.out_proj(o)
    y = y + layer.mlp(layer.layer_norm2(y))
    for blk in vm.encoder.layers[1:]:
        y = blk(y, None)
        y = y[0] if isinstance(y, tuple) else y
    s = F.normalize(bundle.model.visual_projection(vm.post_layernorm(y[:, 0])), dim=-1) @ target.embedding
    g = torch.autograd.grad(s.sum(), o)[0][:, 0]
    assert g.abs().max() > 0
    torch.testing.assert_close(every.grads[0], g, atol=1e-6, rtol=1e-4)
    # the map is the ReLU of the summed signed per-block contributions, not a sum of per-block maps
    ours = explain(bundle, pv, target_embedding=target.embedding, method="grad_eclip", words=False, blocks=n)
    want = _reference_map(every)
    np.testing.assert_allclose(ours["heatmap"].ravel(), (want / want.max()).numpy(), atol=1e-5)
    assert not np.allclose(ours["heatmap"], explain(bundle, pv, target_embedding=target.embedding,
                                                    method="grad_eclip", words=False)["heatmap"], atol=1e-3)
    assert ours["blocks"] == n


def test_direct_gradient_is_the_residual_path(bundle, pv, target):
    """gradient="direct": ∂S/∂o_l = W_out,lᵀ ∂S/∂x_L at every block, from the same forward pass."""
    vm = bundle.model.vision_model
    n = len(vm.encoder.layers)
    exact = last_block(bundle, pv, target.embedding, blocks=n)
    direct = last_block(bundle, pv, target.embedding, blocks=n, gradient="direct")
    torch.testing.assert_close(direct.cosine, exact.cosine, atol=1e-6, rtol=0)
    torch.testing.assert_close(direct.embedding, exact.embedding, atol=1e-6, rtol=0)
    for pd, pe in zip(direct.probes, exact.probes):  # the same q, k, v: only the channel weights differ
        torch.testing.assert_close(pd.v, pe.v, atol=1e-6, rtol=0)
        torch.testing.assert_close(pd.k, pe.k, atol=1e-6, rtol=0)
    # independent: the final [CLS] residual a leaf, its gradient mapped back through each block's out_proj
    with torch.no_grad():
        x = vm(pixel_values=pv).last_hidden_state[:, 0]
    x.requires_grad_(True)
    s = F.normalize(bundle.model.visual_projection(vm.post_layernorm(x)), dim=-1) @ target.embedding
    g = torch.autograd.grad(s.sum(), x)[0]
    for layer, gd in zip(vm.encoder.layers, direct.grads):
        torch.testing.assert_close(gd, g @ layer.self_attn.out_proj.weight, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(direct.grads[0], exact.grads[0], atol=1e-4)  # earlier blocks: an approximation
    # the map is (E5) with these weights
    ours = explain(bundle, pv, target_embedding=target.embedding, method="grad_eclip", words=False, blocks=n,
                   gradient="direct")
    want = _reference_map(direct)
    np.testing.assert_allclose(ours["heatmap"].ravel(), (want / want.max()).numpy(), atol=1e-5)
    assert ours["gradient"] == "direct"


def test_direct_gradient_is_exact_where_the_residual_is_the_only_path(bundle, pv, target):
    """With the last block's MLP silenced, nothing lies between its attention output and the embedding but
    the residual stream: the direct and the exact gradient agree there."""
    model = copy.deepcopy(bundle.model)
    with torch.no_grad():
        model.vision_model.encoder.layers[-1].mlp.fc2.weight.zero_()
        model.vision_model.encoder.layers[-1].mlp.fc2.bias.zero_()
    quiet = dataclasses.replace(bundle, model=model, _text_cache={})
    exact = last_block(quiet, pv, target.embedding)
    direct = last_block(quiet, pv, target.embedding, gradient="direct")
    assert exact.grad.abs().max() > 0
    torch.testing.assert_close(direct.grad, exact.grad, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("gradient,method", [("fast", "medgrad"), (None, "grad_eclip"), ("direct", "attention"),
                                             ("direct", "grad_eclip_single_head")])
def test_bad_gradient_is_refused(bundle, pv, target, gradient, method):
    with pytest.raises(ValueError, match="gradient"):
        explain(bundle, pv, target_embedding=target.embedding, method=method, gradient=gradient)


@pytest.mark.parametrize("blocks,method", [(0, "medgrad"), (99, "grad_eclip"), (1.5, "medgrad"), (True, "medgrad"),
                                           (2, "attention"), (2, "grad_eclip_single_head")])
def test_bad_blocks_are_refused(bundle, pv, target, blocks, method):
    with pytest.raises(ValueError, match="blocks"):
        explain(bundle, pv, target_embedding=target.embedding, method=method, blocks=blocks)


@pytest.mark.parametrize("method", ["medgrad", "grad_eclip", "grad_eclip_single_head", "attention"])
def test_heatmap_shape_and_range(bundle, pv, method):
    r = explain(bundle, pv, target_text="nodule", method=method, words=False)
    assert r["grid"] == (14, 14) and r["heatmap"].shape == (14, 14) and r["upsampled"].shape == (224, 224)
    for m in (r["heatmap"], r["upsampled"]):
        assert m.dtype == np.float32 and m.min() >= 0 and m.max() <= 1 + 1e-6
    assert r["heatmap"].max() == pytest.approx(1.0)
    assert r["negated"] is False and r["target"] == "nodule" and -1 <= r["cosine"] <= 1


def test_attention_needs_no_target_and_image_size_is_kept(bundle):
    img = _image(3, size=300)[:, :260]
    r = explain(bundle, image=img, method="attention")
    assert r["cosine"] is None and r["upsampled"].shape == (300, 260)
    r = explain(bundle, image=img, target_text="nodule", method="medgrad", words=False)
    assert r["radius_px"] == effective_radius(5, (300, 260)) == 6


@pytest.mark.parametrize("which", ["bundle", "sharp"])
def test_single_head_differs_from_multi_head(request, pv, which):
    b = request.getfixturevalue(which)
    multi = explain(b, pv, target_text="nodule", method="grad_eclip", words=False)
    single = explain(b, pv, target_text="nodule", method="grad_eclip_single_head", words=False)
    assert np.abs(multi["heatmap"] - single["heatmap"]).max() > 0.05
    # the single-head recomputation explains another forward pass: its cosine is not the model's
    assert multi["explained_cosine"] is None and single["cosine"] == pytest.approx(multi["cosine"])
    if which == "sharp":
        assert abs(single["explained_cosine"] - single["cosine"]) > 1e-3


def test_local_entropy_flat_textured_and_radius(bundle):
    assert local_entropy(np.full((224, 224), 0.5)).max() == pytest.approx(0.0, abs=1e-9)
    assert torch.equal(entropy_weights(np.full((224, 224), 0.5), (14, 14)), torch.ones(14, 14))  # no information
    rng = np.random.default_rng(0)
    img = np.full((224, 224), 0.5, np.float32)
    img[:, :112] = rng.uniform(0, 1, (224, 112))
    w = entropy_weights(img, (14, 14))
    assert w.max() == pytest.approx(1.0) and float(w[:, :6].min()) > 0.9 and float(w[:, 8:].max()) == 0
    assert effective_radius(5, (224, 224)) == 5 and effective_radius(5, (448, 512)) == 10
    for bad in (0, -1, float("nan")):
        with pytest.raises(ValueError, match="radius"):
            local_entropy(img, radius=bad)
        with pytest.raises(ValueError, match="radius"):
            explain(bundle, image=img, target_text="nodule", radius=bad)


def test_entropy_weights_are_kept_per_image_content():
    rng = np.random.default_rng(5)
    img = rng.uniform(0, 1, (224, 224)).astype(np.float32)
    img[:, 112:] = 0.5
    first = entropy_weights(img, (14, 14))
    first.zero_()  # a caller scribbling on its copy does not reach the kept weights
    again = entropy_weights(img.copy(), (14, 14))
    fresh = F.adaptive_avg_pool2d(torch.from_numpy(local_entropy(img))[None, None], (14, 14))[0, 0]
    torch.testing.assert_close(again, fresh / fresh.max())
    other = img.copy()
    other[:, 112:] = rng.uniform(0, 1, (224, 112))  # same shape, other content: recomputed
    assert float(entropy_weights(other, (14, 14))[:, 8:].min()) > 0.5 and float(again[:, 8:].max()) == 0
    assert not torch.equal(entropy_weights(img, (7, 7)), entropy_weights(img, (7, 7), radius=2))


def test_local_entropy_bins_and_large_images():
    rng = np.random.default_rng(2)
    img = rng.uniform(0, 1, (224, 224)).astype(np.float32)
    # uniform noise: the entropy approaches log2(bins), capped by the disk's pixel count (81 at radius 5)
    assert float(np.median(local_entropy(img, bins=16))) == pytest.approx(4.0, abs=0.25)
    assert float(np.median(local_entropy(img, bins=64))) > 5.0  # > log2(16): more levels resolved
    for bad in (1, 257, 3.5):
        with pytest.raises(ValueError, match="bins"):
            local_entropy(img, bins=bad)
    big = np.kron(img, np.ones((3, 3), np.float32))  # 672 px: block-averaged back to 224 before the filter
    e = local_entropy(big)
    assert e.shape == (224, 224) and np.allclose(e, local_entropy(img))


def test_entropy_weighting_moves_mass_to_the_textured_half(bundle):
    rng = np.random.default_rng(1)
    img = np.full((224, 224), 0.5, np.float32)
    img[:, :112] = rng.uniform(0, 1, (224, 112))  # left: texture, right: flat
    pv = _pv(bundle, img)
    plain = explain(bundle, pv, target_text="nodule", method="grad_eclip", image=img, words=False)["heatmap"]
    med = explain(bundle, pv, target_text="nodule", method="medgrad", image=img, words=False)["heatmap"]

    def left(m):
        return m[:, :7].sum() / m.sum()

    assert plain.sum() > 0 and left(med) > left(plain) and left(med) > 0.9
    # entropy on the heatmap instead: still a valid map
    hm = explain(bundle, pv, target_text="nodule", method="medgrad", entropy_on="heatmap", words=False)
    assert hm["heatmap"].shape == (14, 14) and hm["heatmap"].max() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="entropy_on"):
        explain(bundle, pv, target_text="nodule", entropy_on="mask")


def test_negated_prompt_explains_the_affirmed_finding(bundle, pv):
    pos = explain(bundle, pv, target_text="pleural effusion")
    neg = explain(bundle, pv, target_text="no pleural effusion")
    assert pos["negated"] is False and neg["negated"] is True
    assert neg["target"] == pos["target"] == "pleural effusion" and neg["prompt"] == "no pleural effusion"
    np.testing.assert_allclose(neg["heatmap"], pos["heatmap"], atol=1e-6)
    assert neg["cosine"] == pytest.approx(pos["cosine"]) and neg["words"] == pos["words"]
    # without templates the target is the bare finding text, still polarity-aware
    bare = [explain(bundle, pv, target_text=t, templates=None, words=False) for t in ("effusion", "free of effusion")]
    np.testing.assert_allclose(bare[0]["heatmap"], bare[1]["heatmap"], atol=1e-6)
    assert [b["negated"] for b in bare] == [False, True]
    with torch.no_grad():
        cos = float(bundle.encode_images(pv)[0] @ bundle.encode_texts(["effusion"])[0])
    assert bare[1]["cosine"] == pytest.approx(cos, abs=1e-5)


def test_target_embedding_and_bad_targets(bundle, pv, target):
    by_text = explain(bundle, pv, target_text="nodule", method="grad_eclip", words=False)
    by_emb = explain(bundle, pv, target_embedding=target.embedding * 3, method="grad_eclip")
    np.testing.assert_allclose(by_emb["heatmap"], by_text["heatmap"], atol=1e-6)
    assert by_emb["negated"] is False and by_emb["words"] is None and by_emb["target"] is None
    with pytest.raises(ValueError, match="not both"):
        explain(bundle, pv, target_text="nodule", target_embedding=target.embedding)
    with pytest.raises(ValueError, match="needs a target"):
        explain(bundle, pv)
    with pytest.raises(ValueError, match="shape"):
        explain(bundle, pv, target_embedding=torch.ones(7))
    with pytest.raises(ValueError, match="empty"):
        explain(bundle, pv, target_text="  ")
    with pytest.raises(ValueError, match="unknown method"):
        explain(bundle, pv, target_text="nodule", method="gradcam")


@pytest.mark.parametrize("blocks", [1, 2])
def test_volume_uses_one_scale(bundle, blocks):
    imgs = [_image(s) for s in (4, 5, 6)]
    vol = explain_volume(bundle, lambda z: imgs[z], 3, target_text="nodule", batch_size=2, blocks=blocks)
    hm = vol["heatmaps"]
    assert hm.shape == (3, 14, 14) and vol["upsampled"].shape == (3, 224, 224) and vol["cosines"].shape == (3,)
    per_slice = hm.reshape(3, -1).max(1)
    assert hm.max() == pytest.approx(1.0) and per_slice.min() < 0.999  # a weaker slice is not stretched to 1
    for z in range(3):  # each slice is its 2D explanation times (its max / the volume max)
        r = explain(bundle, image=imgs[z], target_text="nodule", words=False, blocks=blocks)
        np.testing.assert_allclose(hm[z], r["heatmap"] * r["scale"] / vol["scale"], atol=1e-5)
        assert vol["cosines"][z] == pytest.approx(r["cosine"], abs=1e-5)


def test_word_importance_real_tokens_and_determinism(bundle, pv):
    # A random tiny CLIP has learnt nothing, so "the finding word outranks the filler" cannot be
    # justified here; this checks the mechanics: one score per real word, no specials or padding.
    text = "there is a nodule ."
    tokens, scores = word_importance(bundle, text, pixel_values=pv)
    assert tokens == ["there", "is", "a", "nodule", "."]
    assert len(scores) == 5 and min(scores) >= 0 and sum(scores) == pytest.approx(1.0)
    assert word_importance(bundle, text, pixel_values=pv) == (tokens, scores)
    t1, s1 = word_importance(bundle, text, pixel_values=pv, layers=1)
    assert t1 == tokens and len(s1) == 5
    with pytest.raises(ValueError, match="layers"):
        word_importance(bundle, text, pixel_values=pv, layers=9)
    # explain() scores the text the zero-shot scorer scores (an affirmed prompt as typed)
    prompt = "a chest x-ray showing a nodule in the left upper lobe"
    r = explain(bundle, pv, target_text=prompt)
    assert r["target"] == prompt and r["words"]["tokens"] == words(prompt)
    assert len(r["words"]["scores"]) == len(words(prompt))


def test_medgrad_entropy_beside_the_forward_gives_the_same_map(bundle):
    rng = np.random.default_rng(11)
    img = rng.uniform(0, 1, (224, 224)).astype(np.float32)
    img[:, :100] = 0.3  # flat half: entropy 0 there, so the entropy really shapes the map
    clear_entropy_cache()
    a = explain(bundle, image=img, target_text="nodule", words=False)
    clear_entropy_cache()
    b = explain(bundle, image=img, target_text="nodule", words=False, overlap_entropy=False)
    np.testing.assert_allclose(a["heatmap"], b["heatmap"], atol=1e-6)
    g = explain(bundle, image=img, target_text="nodule", words=False, method="grad_eclip")
    assert not np.allclose(a["heatmap"], g["heatmap"], atol=1e-3)  # the entropy weights did multiply in
    assert float(a["heatmap"][:, :5].max()) == 0  # columns of flat image: no entropy, no heat
    vol = explain_volume(bundle, lambda z: img, 2, target_text="nodule", upsample=False)
    np.testing.assert_allclose(vol["heatmaps"][0] / vol["heatmaps"][0].max(), a["heatmap"], atol=1e-5)
