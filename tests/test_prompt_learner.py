"""ClinCoCoOp prompt learner (methods.md §3): pooling, shapes, frozen CLIP, concept weights, alignment,
few-shot training on derm phantoms, checkpoints."""
import json

import numpy as np
import pytest
import torch

from clinlens.data.phantoms import DERM_CONCEPTS, DERM_DIAGNOSES, make_derm
from clinlens.models.csr import concept_text_embeddings, patch_features
from clinlens.models.prompt_learner import FORMAT, ClinCoCoOp, class_concepts_from_labels

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _model(bundle, seed=0, **kw):
    torch.manual_seed(seed)
    return ClinCoCoOp.from_bundle(bundle, DERM_DIAGNOSES, DERM_CONCEPTS, **kw)


@pytest.fixture(scope="module")
def derm(bundle):
    """90 derm phantoms (96 px): pixels of the first 4, cached features, class and concept labels."""
    samples = [make_derm(i, size=96) for i in range(90)]
    pv = bundle.pixel_values(np.stack([s.image for s in samples]).astype(np.float32) / 255)
    f, z = _model(bundle).encode_image(pv)
    y = torch.tensor([DERM_DIAGNOSES.index(s.diagnosis) for s in samples])
    cy = torch.tensor([[s.concepts[c] for c in DERM_CONCEPTS] for s in samples])
    return pv[:4], f, z, y, cy


def _token_embeddings(bundle, phrase):
    ids = bundle.tokenizer(phrase, add_special_tokens=False)["input_ids"]
    return bundle.model.text_model.embeddings.token_embedding.weight[torch.tensor(ids)].detach().clone()


def test_soft_prompt_with_real_tokens_equals_encode_texts(bundle, derm):
    """Context = real token embeddings -> exactly CLIP's own text features (pools at EOS, not at padding)."""
    m = _model(bundle)  # ctx_init "a photo of a", zero meta-net output
    with torch.no_grad():
        ref = bundle.encode_texts([f"a photo of a {c}." for c in DERM_DIAGNOSES], cache=False)
        assert torch.allclose(m.text_features(), ref, atol=1e-5)
        per_image = m.text_features(derm[1][:2])  # CoCoOp path, (B, C, E)
        assert per_image.shape == (2, 3, ref.shape[1]) and torch.allclose(per_image, ref.expand(2, -1, -1), atol=1e-5)
        m2 = _model(bundle, n_ctx=2, ctx_init=None)
        m2.ctx.copy_(_token_embeddings(bundle, "there is"))
        ref2 = bundle.encode_texts([f"there is {c}." for c in DERM_DIAGNOSES], cache=False)
        assert torch.allclose(m2.text_features(), ref2, atol=1e-5)
        # the guard: "nevus." is padded to the longest class prompt; pooling at the last position is wrong
        x = m2.prompt_embeddings(m2.ctx)
        assert int(m2.eos_pos[0]) < x.shape[1] - 1
        wrong = m2.encode_prompt_embeddings(x[:1], torch.tensor([x.shape[1] - 1]))
        assert not torch.allclose(wrong, ref2[:1], atol=1e-3)


def test_image_features_match_clip_and_csr(bundle, derm):
    pv = derm[0][:2]
    f, z = _model(bundle).encode_image(pv)
    with torch.no_grad():
        assert torch.allclose(f, bundle.encode_images(pv), atol=1e-5)
        p = patch_features(bundle.model.vision_model, pv).flatten(2).transpose(1, 2)
        assert torch.allclose(z, bundle.model.visual_projection(p), atol=1e-5)
    m = _model(bundle)
    assert torch.allclose(m.anchors, concept_text_embeddings(bundle, DERM_CONCEPTS), atol=1e-6)


def test_shapes_and_cached_features(bundle, derm):
    pv, f, z, y, _ = derm
    m = _model(bundle).eval()
    C, K, N, E = 3, len(DERM_CONCEPTS), 196, 128
    with torch.no_grad():
        out = m(pv[:2], labels=y[:2])
        cached = m(image_features=f[:2], patch_tokens=z[:2], labels=y[:2])
    assert out["logits"].shape == (2, C) and out["global"].shape == (2, C) and out["local"].shape == (2, C)
    assert out["alpha"].shape == (2, K) and out["alpha_all"].shape == (2, C, K)
    assert out["beta"].shape == (2, C, N) and out["text"].shape == (2, C, E)
    assert set(out["loss"]) == {"ce", "align", "local", "total"}
    assert torch.allclose(out["logits"], cached["logits"], atol=1e-4)
    assert torch.allclose(out["probs"].sum(-1), torch.ones(2))
    coop = _model(bundle, conditional=False)
    assert coop.meta_net is None and coop(image_features=f[:2], patch_tokens=z[:2])["text"].shape == (C, E)
    assert "loss" not in coop(image_features=f[:2], patch_tokens=z[:2])
    with pytest.raises(ValueError, match="pixel_values"):
        m(image_features=f[:2])


def test_local_term_and_logits_by_hand(bundle, derm):
    """The global-local term (methods.md §3), recomputed independently: ẑ_i = normalize(z_i + P_i),
    β_ci = softmax_i(cos(ẑ_i, g_c)/τ_l), local_c = Σ_i β_ci cos(ẑ_i, g_c), logit_c = s (cos(f, g_c) + λ local_c)."""
    _, f, z, y, _ = derm
    m = _model(bundle, local_weight=0.5, local_temperature=0.2).eval()
    with torch.no_grad():
        m.pos_embed.normal_(0, 0.5)  # a positional encoding that matters (it starts at zero)
        out = m(image_features=f[:3], patch_tokens=z[:3])
    g = out["text"]  # (B, C, E), normalised soft-prompt features
    zh = torch.nn.functional.normalize(z[:3] + m.pos_embed.detach(), dim=-1)
    cos = torch.einsum("bne,bce->bcn", zh, g)
    beta = torch.softmax(cos / 0.2, dim=-1)
    local = (beta * cos).sum(-1)
    glob = torch.einsum("be,bce->bc", torch.nn.functional.normalize(f[:3], dim=-1), g)
    assert torch.allclose(out["beta"], beta, atol=1e-5) and torch.allclose(out["local"], local, atol=1e-5)
    assert torch.allclose(out["logits"], m.logit_scale * (glob + 0.5 * local), atol=1e-3)
    # the positional encoding and the temperature both change the term (neither is ignored)
    flat = (torch.nn.functional.normalize(z[:3], dim=-1)[:, None] * g[:, :, None]).sum(-1)
    assert not torch.allclose(local, (torch.softmax(flat / 0.2, -1) * flat).sum(-1), atol=1e-4)
    assert not torch.allclose(local, (torch.softmax(cos / 0.07, -1) * cos).sum(-1), atol=1e-4)


def test_clip_stays_frozen_prompt_parts_learn(bundle, derm):
    pv, _, _, y, _ = derm
    m = _model(bundle)
    for p in bundle.model.parameters():
        p.grad = None
    m(pv[:2], labels=y[:2])["loss"]["total"].backward()
    assert all(p.grad is None for p in bundle.model.parameters())
    names = {n for n, _ in m.named_parameters()}
    assert names == {"ctx", "pos_embed", "meta_net.0.weight", "meta_net.0.bias", "meta_net.2.weight", "meta_net.2.bias"}
    for n in ("ctx", "pos_embed", "meta_net.2.weight"):
        g = dict(m.named_parameters())[n].grad
        assert g is not None and g.abs().sum() > 0, n


def test_alpha_is_a_per_image_distribution_over_class_concepts(bundle, derm):
    _, f, z, y, _ = derm
    cc = {"nevus": ["pigment network", "dots and globules"], "melanoma": ["asymmetry", "irregular border",
          "blue-white veil", "streaks"]}  # seborrheic keratosis: all concepts
    m = _model(bundle, class_concepts=cc)
    with torch.no_grad():
        out = m(image_features=f[:8], patch_tokens=z[:8], labels=y[:8])
    a, aa = out["alpha"], out["alpha_all"]
    assert torch.allclose(aa.sum(-1), torch.ones(8, 3), atol=1e-5) and torch.allclose(a.sum(-1), torch.ones(8))
    assert torch.equal(a, aa[torch.arange(8), y[:8]])
    idx = [DERM_CONCEPTS.index(c) for c in DERM_CONCEPTS if c not in cc["nevus"]]
    assert aa[:, 0, idx].abs().max() == 0 and (aa[:, 2] > 0).all()
    # α follows cos(f, t_j): the largest weight sits on the most similar concept
    cos = f[:8] @ m.anchors.T
    assert torch.equal(aa[:, 2].argmax(-1), cos.argmax(-1))
    assert (aa[0, 2] - aa[1:, 2]).abs().amax(-1).min() > 1e-4  # changes with the image
    with pytest.raises(ValueError, match="not a subset"):
        _model(bundle, class_concepts={"nevus": ["freckles"]})
    with pytest.raises(ValueError, match="unknown classes"):
        _model(bundle, class_concepts={"wart": ["streaks"]})


def test_a_class_without_findings_gets_no_concepts_and_no_alignment(bundle, derm):
    """A 'normal' class (its images show no concept) gets no concept: α = 0 and its images add no alignment,
    instead of being pulled towards an arbitrary finding."""
    _, f, z, y, cy = derm
    cy = cy.clone()
    cy[y == 0] = 0  # nevus images: no concept at all
    cc = class_concepts_from_labels(cy, y, DERM_CONCEPTS, DERM_DIAGNOSES)
    assert cc["nevus"] == [] and cc["melanoma"] and cc["seborrheic keratosis"]
    m = _model(bundle, class_concepts=cc)
    with torch.no_grad():
        out = m(image_features=f[:24], patch_tokens=z[:24], labels=y[:24])
    a = out["alpha_all"]
    assert torch.isfinite(a).all() and a[:, 0].abs().max() == 0
    assert torch.allclose(a[:, 1:].sum(-1), torch.ones(24, 2), atol=1e-5)
    assert torch.equal(out["alpha"][y[:24] == 0], torch.zeros(int((y[:24] == 0).sum()), len(DERM_CONCEPTS)))
    # the alignment is the mean over the images whose class has concepts only
    with torch.no_grad():
        others = m(image_features=f[:24][y[:24] != 0], patch_tokens=z[:24][y[:24] != 0], labels=y[:24][y[:24] != 0])
    assert (y[:24] == 0).any() and torch.allclose(out["loss"]["align"], others["loss"]["align"], atol=1e-6)
    assert torch.isfinite(out["loss"]["total"])


def test_alignment_pulls_prompt_towards_weighted_anchor(bundle, derm):
    _, f, z, y, cy = derm
    cc = class_concepts_from_labels(cy, y, DERM_CONCEPTS, DERM_DIAGNOSES)
    m = _model(bundle, class_concepts=cc)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    hist = []
    for _ in range(10):
        loss = m(image_features=f[:16], patch_tokens=z[:16], labels=y[:16])["loss"]["align"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        hist.append(loss.item())
    print("align loss", [round(h, 4) for h in hist])
    assert hist[-1] < 0.5 * hist[0], hist


def test_few_shot_training_beats_zero_shot(bundle, derm):
    """60 train / 30 held-out derm phantoms on the frozen random tiny CLIP; cached features, Adam."""
    _, f, z, y, cy = derm
    tr, te = slice(0, 60), slice(60, 90)
    cc = class_concepts_from_labels(cy[tr], y[tr], DERM_CONCEPTS, DERM_DIAGNOSES)
    # λ = 1: the random tiny CLIP's global feature carries little; its patch tokens carry colour
    m = _model(bundle, class_concepts=cc, local_weight=1.0)

    def acc(sl):
        with torch.no_grad():
            return float((m(image_features=f[sl], patch_tokens=z[sl])["logits"].argmax(-1) == y[sl]).float().mean())

    zs_train, zs_test = acc(tr), acc(te)
    opt = torch.optim.Adam(m.parameters(), lr=2e-3)
    losses = []
    for _ in range(50):
        loss = m(image_features=f[tr], patch_tokens=z[tr], labels=y[tr])["loss"]["total"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    tr_acc, te_acc = acc(tr), acc(te)
    print(f"zero-shot {zs_train:.2f}/{zs_test:.2f} -> trained {tr_acc:.2f}/{te_acc:.2f}; loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert losses[-1] < 0.7 * losses[0]
    assert tr_acc >= zs_train + 0.2
    assert te_acc >= zs_test + 0.15


def test_save_load_round_trip(bundle, derm, tmp_path):
    _, f, z, y, cy = derm
    cc = class_concepts_from_labels(cy, y, DERM_CONCEPTS, DERM_DIAGNOSES)
    m = _model(bundle, class_concepts=cc, n_ctx=3, ctx_init=None, local_weight=0.5)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    path = m.save(tmp_path / "pl.safetensors", extra={"steps": 0})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pl.json", "pl.safetensors"]  # no temp files left

    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        keys, meta = set(fh.keys()), fh.metadata()
    assert keys == {"ctx", "pos_embed", "meta_net.0.weight", "meta_net.0.bias", "meta_net.2.weight", "meta_net.2.bias"}
    cfg = json.loads(meta["config"])
    assert meta["format"] == FORMAT and cfg["classes"] == DERM_DIAGNOSES and cfg["concepts"] == DERM_CONCEPTS
    assert cfg["class_concepts"] == cc and cfg["n_ctx"] == 3 and cfg["local_weight"] == 0.5
    assert json.loads((tmp_path / "pl.json").read_text())["steps"] == 0

    m2 = ClinCoCoOp.load(bundle, path)
    s1, s2 = m.state_dict(), m2.state_dict()
    assert s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)
    assert m2.full_config() == m.full_config()
    with torch.no_grad():
        o1 = m.eval()(image_features=f[:4], patch_tokens=z[:4])
        o2 = m2(image_features=f[:4], patch_tokens=z[:4])
    assert torch.equal(o1["logits"], o2["logits"]) and torch.equal(o1["alpha"], o2["alpha"])

    bad = tmp_path / "bad.safetensors"
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(bad), metadata={"format": "other"})
    with pytest.raises(ValueError, match="not a clinlens prompt learner"):
        ClinCoCoOp.load(bundle, bad)
    with pytest.raises(FileNotFoundError):
        ClinCoCoOp.load(bundle, tmp_path / "missing.safetensors")
