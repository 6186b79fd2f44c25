"""CSR model (methods.md §2): stages, loss, clinician interaction, text grounding, atlas, checkpoints, training."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clinlens.data.phantoms import DERM_CONCEPTS, DERM_DIAGNOSES, make_derm
from clinlens.models.csr import CSRModel, box_importance, concept_text_embeddings, patch_features

pytestmark = pytest.mark.usefixtures("one_torch_thread")

M = 3


def _model(bundle, seed=0, **kw):
    torch.manual_seed(seed)
    return CSRModel.from_bundle(bundle, DERM_CONCEPTS, DERM_DIAGNOSES, n_prototypes=M, **kw)


@pytest.fixture(scope="module")
def derm(bundle):
    """90 small derm phantoms (96 px): pixel values, features, concept and class labels."""
    samples = [make_derm(i, size=96) for i in range(90)]
    pv = bundle.pixel_values(np.stack([s.image for s in samples]).astype(np.float32) / 255)
    with torch.no_grad():
        feats = patch_features(bundle.model.vision_model, pv)
    y = torch.tensor([[s.concepts[c] for c in DERM_CONCEPTS] for s in samples], dtype=torch.float32)
    cls = torch.tensor([DERM_DIAGNOSES.index(s.diagnosis) for s in samples])
    return pv, feats, y, cls


def _auroc(score, label):
    """Macro AUROC over the columns that have both classes (Mann-Whitney, ties averaged)."""
    out = []
    for s, y in zip(score.T.tolist(), label.T.tolist()):
        s, y = np.asarray(s), np.asarray(y) > 0.5
        if y.all() or not y.any():
            continue
        order = np.argsort(s, kind="mergesort")
        ranks = np.empty(len(s))
        ranks[order] = np.arange(1, len(s) + 1)
        for v in np.unique(s):
            ranks[s == v] = ranks[s == v].mean()
        n1 = y.sum()
        out.append((ranks[y].sum() - n1 * (n1 + 1) / 2) / (n1 * (len(y) - n1)))
    return float(np.mean(out))


def test_shapes_of_every_stage_and_frozen_backbone(bundle, derm):
    pv = derm[0][:2]
    m = _model(bundle)
    K, P, D = len(DERM_CONCEPTS), len(DERM_CONCEPTS) * M, 128
    f = m.features(pv)
    assert f.shape == (2, D, 14, 14) and not f.requires_grad
    cams = m.cams(f)
    assert cams.shape == (2, K, 14, 14) and m.pool_cams(cams).shape == (2, K)
    v, drawn = m.concept_vectors(f, cams)
    assert v.shape == (2, K, D) and not drawn.any()
    # stage 2 default weights are softmax_hw(cam_k)
    w = cams.flatten(2).softmax(-1)
    assert torch.allclose(v, torch.einsum("bkn,bdn->bkd", w, f.flatten(2)), atol=1e-5)
    vp = m.project(v)
    assert vp.shape == (2, K, 128) and torch.allclose(vp.norm(dim=-1), torch.ones(2, K), atol=1e-5)
    assert m.concept_similarity(vp.flatten(0, 1)).shape == (2 * K, K)
    out = m(pv)
    assert out["sim_maps"].shape == (2, P, 14, 14) and out["proto_scores"].shape == (2, P)
    assert out["concept_scores"].shape == (2, K) and out["logits"].shape == (2, len(DERM_DIAGNOSES))
    assert out["importance"].shape == (2, 1, 14, 14) and bool((out["importance"] == 1).all())
    assert torch.allclose(out["concept_scores"], out["proto_scores"].view(2, K, M).amax(-1))
    # cached features give the same answer as pixels
    assert torch.allclose(m(features=f)["logits"], out["logits"])
    # losses: every stage's parts get gradients; the frozen CLIP gets none
    m.train()
    y = torch.tensor([[1, 0, 1, 0, 0, 1], [0, 1, 0, 0, 1, 0]], dtype=torch.float32)
    loss = m.losses(y, torch.tensor([0, 2]), pixel_values=pv)
    assert set(loss) == {"bce", "contrastive", "text", "task", "region", "total"}
    assert all(torch.isfinite(x) for x in loss.values()) and loss["contrastive"] > 0
    loss["total"].backward()
    for p in (m.concept_w, m.prototypes, m.proj_lin.weight, m.proj_mlp[2].weight, m.task_w):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert all(p.grad is None for p in bundle.model.parameters())
    assert not any(k.startswith("backbone.") for k in m.state_dict())
    # fine-tuning: an own, saved copy of the vision tower that learns
    ft = _model(bundle, finetune_backbone=True).train()
    assert any(k.startswith("backbone.") for k in ft.state_dict())
    ft.losses(y, torch.tensor([0, 2]), pixel_values=pv)["total"].backward()
    assert ft.backbone.encoder.layers[-1].mlp.fc2.weight.grad.abs().sum() > 0
    assert ft.backbone is not bundle.model.vision_model
    assert all(p.grad is None for p in bundle.model.parameters())
    avg = _model(bundle, cam_pool="avg")
    assert torch.allclose(avg.pool_cams(cams), cams.mean((2, 3)))


def test_contrastive_loss_formula_margin_sign_and_learning(bundle):
    torch.manual_seed(0)
    m = _model(bundle, seed=1)
    K = len(DERM_CONCEPTS)
    vp = F.normalize(torch.randn(12, 128), dim=-1)
    tgt = torch.arange(12) % K
    # the formula, by hand: soft assignment over each concept's M prototypes, then the margin CE
    p = F.normalize(m.prototypes.detach(), dim=-1).view(K, M, -1)
    dots = torch.einsum("ne,kme->nkm", vp, p)

    def by_hand(lam, gam, dl):
        sim = ((gam * dots).softmax(-1) * dots).sum(-1)
        logit = lam * sim - lam * dl * F.one_hot(tgt, K)
        return sim, -(logit.gather(1, tgt[:, None]).squeeze(1) - torch.logsumexp(logit, 1)).mean()

    lam, gam, dl = 10.0, 5.0, 0.1
    assert (m.config["lam"], m.config["gamma"], m.config["delta"]) == (lam, gam, dl)  # the defaults
    sim, ref = by_hand(lam, gam, dl)
    assert torch.allclose(m.concept_similarity(vp), sim, atol=1e-5)
    plus = m.contrastive_loss(vp, tgt)
    assert torch.allclose(plus, ref, atol=1e-5)
    # configured otherwise, the loss follows each of λ, γ, δ (a constant in place of any would fail here)
    other = _model(bundle, seed=1, lam=4.0, gamma=20.0, delta=0.3)
    sim2, ref2 = by_hand(4.0, 20.0, 0.3)
    assert torch.allclose(other.concept_similarity(vp), sim2, atol=1e-5) and not torch.allclose(sim2, sim, atol=1e-3)
    assert torch.allclose(other.contrastive_loss(vp, tgt), ref2, atol=1e-5) and abs(float(ref2 - ref)) > 1e-3
    m.config["margin_sign"] = -1.0
    minus = m.contrastive_loss(vp, tgt)
    assert minus < plus - 0.05  # adding δ to the target similarity makes the task easier
    m.config["margin_sign"] = 1.0
    with pytest.raises(ValueError):
        _model(bundle, margin_sign=0.5)

    # toy problem: concept vectors around K random centres; the loss must fall a lot
    centres = torch.randn(K, 128) * 2
    v = centres[tgt] + 0.5 * torch.randn(12, 128)
    opt = torch.optim.Adam([m.prototypes, *m.proj_mlp.parameters(), m.proj_lin.weight], lr=1e-2)
    first = m.contrastive_loss(m.project(v), tgt).item()
    for _ in range(60):
        opt.zero_grad()
        loss = m.contrastive_loss(m.project(v), tgt)
        loss.backward()
        opt.step()
    assert loss.item() < 0.3 * first


def test_box_importance_maps_and_rescoring(bundle, derm):
    m = _model(bundle)
    # one convention: pixel [x0, y0, x1, y1) on the 224 model input; 16 px patches; any overlap counts
    a = box_importance([[64, 48, 80, 64]], None, 0.2, 1, 224, (14, 14))
    assert a[0, 0, 3, 4] == 1 and a.sum() == pytest.approx(1 + 0.2 * 195)
    a = box_importance(None, [[64, 48, 80, 64]], 0.2, 1, 224, (14, 14))
    assert a[0, 0, 3, 4] == 0 and a.sum() == 195  # only negative boxes: the rest keeps weight 1
    a = box_importance([[64, 48, 81, 64]], None, 0.2, 1, 224, (14, 14))
    assert a[0, 0, 3, 4] == 1 and a[0, 0, 3, 5] == 1 and a[0, 0, 3, 6] == pytest.approx(0.2)
    assert a.sum() == pytest.approx(2 + 0.2 * 194)
    # negative wins over positive; per-image lists
    a = box_importance([[[0, 0, 224, 224]], []], [[0, 0, 16, 16]], 0.3, 2, 224, (14, 14))
    assert a[0, 0, 0, 0] == 0 and a[0, 0, 5, 5] == 1 and bool((a[1, 0, 1:, 1:] == 1).all()) and a[1, 0, 0, 0] == 0
    for bad in ([[0, 0, 225, 10]], [[10, 10, 10, 20]], [[-1, 0, 5, 5]]):
        with pytest.raises(ValueError):
            m.importance_map(pos_boxes=bad)
    with pytest.raises(ValueError):
        m.importance_map(alpha=1.5)

    # synthetic maps: one piece of evidence at patch (3, 4) for prototype 0
    s = torch.zeros(1, m.n_prototypes, 14, 14)
    s[0, 0, 3, 4] = 0.9
    sc = lambda **kw: m.scores_from_maps(s, m.importance_map(alpha=0.2, **kw))[0, 0].item()  # noqa: E731
    assert sc() == pytest.approx(0.9)
    assert sc(neg_boxes=[64, 48, 80, 64]) == pytest.approx(0.0)  # a negative box over the only evidence removes it
    assert sc(pos_boxes=[64, 48, 80, 64]) == pytest.approx(0.9)
    # evidence outside the focus is weighted by α on the shifted cosine: (0.9 + 1) 0.2 − 1 < 0, so the
    # focus box's own cosine 0 wins; the same on a map that is negative everywhere but at the evidence
    assert sc(pos_boxes=[0, 0, 32, 32]) == pytest.approx(0.0)
    s.fill_(-0.5)
    s[0, 0, 3, 4] = 0.9
    assert sc(pos_boxes=[0, 0, 32, 32]) == pytest.approx(max(-0.5, 0.2 * 1.9 - 1))
    assert sc(pos_boxes=[0, 0, 32, 32]) < sc()  # focusing elsewhere never raises a score (raw A ⊙ S gave 0.18 > -0.5)
    # through the full model: A reweights every map before the max
    pv = derm[0][:1]
    base = m(pv)
    out = m(pv, pos_boxes=[[0, 0, 112, 112]], neg_boxes=[[0, 0, 32, 32]], alpha=0.5)
    a = m.importance_map([[0, 0, 112, 112]], [[0, 0, 32, 32]], 0.5)
    assert torch.allclose(out["proto_scores"], ((base["sim_maps"] + 1) * a).flatten(2).amax(-1) - 1)
    assert not torch.allclose(out["proto_scores"], base["proto_scores"])
    assert bool((m(pv, neg_boxes=[0, 0, 224, 224])["proto_scores"] == -1).all())  # nothing left to look at
    # the head reads the boxed scores recentred by their mean drop: only the relative change is evidence
    drop = base["proto_scores"] - out["proto_scores"]
    assert float(drop.mean()) > 0 and bool((drop >= -1e-6).all())  # a focus never raises a score here
    torch.testing.assert_close(out["head_scores"], out["proto_scores"] + drop.mean(1, keepdim=True))
    torch.testing.assert_close(out["logits"], out["head_scores"] @ m.task_w.T + m.task_b)
    torch.testing.assert_close(base["head_scores"], base["proto_scores"])  # no boxes: nothing to recentre
    # negative boxes alone: no uniform fall, so the head reads the boxed scores as they are, per image
    neg = m(pv, neg_boxes=[[0, 0, m.image_size, m.image_size * 3 // 4]])
    assert not torch.allclose(neg["proto_scores"], base["proto_scores"])
    torch.testing.assert_close(neg["head_scores"], neg["proto_scores"])
    pv2 = derm[0][:2]
    mixed = m(pv2, pos_boxes=[[[0, 0, 112, 112]], []], neg_boxes=[[0, 0, 32, 32]], alpha=0.5)
    torch.testing.assert_close(mixed["head_scores"][0], out["head_scores"][0])
    torch.testing.assert_close(mixed["head_scores"][1], mixed["proto_scores"][1])
    flat = m(pv, pos_boxes=[[0, 0, 112, 112]], neg_boxes=[[0, 0, 32, 32]], alpha=1.0)  # α = 1: nothing dimmed
    torch.testing.assert_close(flat["head_scores"], flat["proto_scores"])
    # a rejected concept neither enters the head nor the mean drop
    rej = m.concepts[0]
    out_r = m(pv, pos_boxes=[[0, 0, 112, 112]], neg_boxes=[[0, 0, 32, 32]], alpha=0.5, reject_concepts=[rej])
    kept = m.reject_mask([rej]).bool()
    assert bool((out_r["head_scores"][0, ~kept] == 0).all())
    torch.testing.assert_close(out_r["head_scores"][0, kept], out["proto_scores"][0, kept] + drop[0, kept].mean())
    # box_recentre=False: the paper's rule, the head on the boxed scores themselves
    m.config["box_recentre"] = False
    try:
        plain = m(pv, pos_boxes=[[0, 0, 112, 112]], neg_boxes=[[0, 0, 32, 32]], alpha=0.5)
    finally:
        m.config["box_recentre"] = True
    torch.testing.assert_close(plain["logits"], plain["proto_scores"] @ m.task_w.T + m.task_b)
    assert not torch.allclose(plain["logits"], out["logits"])


def test_reject_concepts_zeroes_scores(bundle, derm):
    m = _model(bundle)
    with torch.no_grad():
        m.task_w.normal_()
    pv = derm[0][:2]
    base = m(pv)
    out = m(pv, reject_concepts=["streaks", 0])
    k = DERM_CONCEPTS.index("streaks")
    assert bool((out["concept_scores"][:, [0, k]] == 0).all())
    assert torch.equal(out["concept_scores"][:, 1:k], base["concept_scores"][:, 1:k])
    rej = (m.proto_concept == 0) | (m.proto_concept == k)
    assert bool((out["proto_scores"][:, rej] == 0).all())
    manual = base["proto_scores"].masked_fill(rej, 0) @ m.task_w.T + m.task_b
    assert torch.allclose(out["logits"], manual, atol=1e-6) and not torch.allclose(out["logits"], base["logits"])
    with pytest.raises(ValueError, match="unknown concepts"):
        m(pv, reject_concepts=["freckles"])


def test_drawn_region_vectors_are_masked_means(bundle, derm):
    m = _model(bundle)
    pv = derm[0][:2]
    f = m.features(pv)
    cams = m.cams(f)
    k = DERM_CONCEPTS.index("blue-white veil")
    grid = torch.zeros(2, len(DERM_CONCEPTS), 14, 14)
    grid[0, k, 2:6, 3:9] = 1
    v_cam, _ = m.concept_vectors(f, cams)
    v, drawn = m.concept_vectors(f, cams, grid)
    assert drawn.tolist() == [[i == k for i in range(len(DERM_CONCEPTS))], [False] * len(DERM_CONCEPTS)]
    assert torch.allclose(v[0, k], f[0, :, 2:6, 3:9].mean((1, 2)), atol=1e-5)
    others = ~drawn
    assert torch.allclose(v[others], v_cam[others])
    # the same region drawn in pixels of the model input (patch-aligned) gives the same vector
    pix = torch.zeros(2, len(DERM_CONCEPTS), 224, 224)
    pix[0, k, 32:96, 48:144] = 1
    assert torch.allclose(m.concept_vectors(f, cams, pix)[0][0, k], v[0, k], atol=1e-5)
    # a drawn concept counts as present in the contrastive loss even when unlabelled
    y = torch.zeros(2, len(DERM_CONCEPTS))
    assert m.losses(y, features=f)["contrastive"] == 0
    assert m.losses(y, features=f, region_masks=grid)["contrastive"] > 0


def test_text_grounding_init_regulariser_and_new_concept(bundle, derm):
    anchors = concept_text_embeddings(bundle, DERM_CONCEPTS)
    m = _model(bundle, proto_init_noise=0.0)
    assert torch.allclose(m.text_anchors, anchors)
    assert torch.allclose(m.prototypes, anchors.repeat_interleave(M, 0), atol=1e-6)
    assert float(m.text_anchor_loss().detach()) == pytest.approx(0.0, abs=1e-6)
    # the anchor space: at init the projector is CLIP's own visual projection of the patch tokens
    f = m.features(derm[0][:1])
    tok = f.flatten(2).transpose(1, 2)
    assert torch.allclose(m.project(tok), F.normalize(bundle.model.visual_projection(tok), dim=-1), atol=1e-5)
    # so S at init is CLIP's patch–text cosine, and the concept head is <t_k, W_clip f>
    sim = m.similarity_maps(f).flatten(2)[0, ::M]
    assert torch.allclose(sim, (anchors @ m.project(tok)[0].T), atol=1e-5)
    assert torch.allclose(m.cams(f).flatten(2)[0], anchors @ bundle.model.visual_projection(tok)[0].T, atol=1e-4)
    noisy = _model(bundle, proto_init_noise=0.1)
    cos = (F.normalize(noisy.prototypes, dim=-1) * anchors.repeat_interleave(M, 0)).sum(-1)
    assert bool((cos > 0.98).all()) and bool((cos < 1 - 1e-4).all())
    # the regulariser pulls displaced prototypes back
    with torch.no_grad():
        m.prototypes.add_(0.1 * torch.randn_like(m.prototypes))
    before = float(m.text_anchor_loss().detach())
    opt = torch.optim.Adam([m.prototypes], lr=0.05)
    for _ in range(20):
        opt.zero_grad()
        m.text_anchor_loss().backward()
        opt.step()
    assert before > 0.01 and float(m.text_anchor_loss().detach()) < 0.3 * before

    # a new concept by text grows every head and leaves predictions unchanged until trained
    m = _model(bundle)
    with torch.no_grad():
        m.task_w.normal_()
    before = m(features=f)
    ids = m.add_concept_by_text(bundle, "regression structures", "white scar-like depigmentation.")
    K = len(DERM_CONCEPTS) + 1
    assert m.concepts[-1] == "regression structures" and len(ids) == M and ids[0] == K * M - M
    assert m.concept_w.shape[0] == K and m.concept_b.shape == (K,) and m.text_anchors.shape[0] == K
    assert m.prototypes.shape[0] == K * M and m.task_w.shape == (len(DERM_DIAGNOSES), K * M)
    new = concept_text_embeddings(bundle, ["regression structures"], ["white scar-like depigmentation."])[0]
    assert torch.allclose(m.text_anchors[-1], new)
    # near the new anchor, within the default init noise (σ = 0.5: cos ≈ 1/√(1 + σ²) ≈ 0.89)
    assert bool(((F.normalize(m.prototypes[-M:], dim=-1) @ new) > 0.8).all())
    after = m(features=f)
    assert after["concept_scores"].shape == (1, K) and after["cams"].shape[1] == K
    assert torch.allclose(after["logits"], before["logits"], atol=1e-6)
    y = torch.zeros(1, K)
    y[0, -1] = 1
    assert torch.isfinite(m.losses(y, torch.tensor([1]), features=f)["total"])
    with pytest.raises(ValueError):
        m.add_concept_by_text(bundle, "streaks")


def test_atlas_pruning_and_refit(bundle, derm):
    pv, feats, y, cls = derm
    m = _model(bundle)
    items = [(f"img{i}", pv[i]) for i in range(6)] + [([f"img{i}" for i in range(6, 10)], pv[6:10])]
    atlas = m.build_atlas(items)
    assert len(atlas) == m.n_prototypes and m.atlas == atlas
    maps = m.similarity_maps(feats[:10]).detach()
    for e in atlas[:: M + 1]:
        i, (r, c) = int(e["image_id"][3:]), e["patch"]
        j = m.proto_ids.tolist().index(e["prototype_id"])
        assert e["box"] == [16 * c, 16 * r, 16 * c + 16, 16 * r + 16]
        assert e["similarity"] == pytest.approx(float(maps[:, j].max().detach()), abs=1e-5)
        assert float(maps[i, j, r, c]) == pytest.approx(e["similarity"], abs=1e-5)
        assert e["concept"] == DERM_CONCEPTS[int(m.proto_concept[j])]
    # prune: all of concept 0 and one of concept 2
    scores = m(features=feats)["proto_scores"].detach()
    drop = [0, 1, 2, 2 * M + 1]
    keep = m.prune_prototypes(drop)
    assert m.n_prototypes == len(DERM_CONCEPTS) * M - 4 and m.task_w.shape[1] == m.n_prototypes
    assert not set(drop) & set(m.proto_ids.tolist()) and not {e["prototype_id"] for e in m.atlas} & set(drop)
    assert torch.allclose(scores[:, keep], m(features=feats)["proto_scores"], atol=1e-6)
    out = m(features=feats)
    assert bool((out["concept_scores"][:, 0] == 0).all())
    loss = m.losses(y, cls, features=feats)
    loss["total"].backward()
    assert torch.isfinite(loss["total"]) and all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
    with pytest.raises(ValueError, match="unknown prototype ids"):
        m.prune_prototypes([0])
    # refit the head on the stored scores
    old = float(((scores[:, keep] @ m.task_w.T + m.task_b).argmax(1) == cls).float().mean())
    majority = float(torch.bincount(cls).max()) / len(cls)
    acc = m.refit_task_head(scores[:, keep], cls, method="logreg")
    assert acc > max(old, majority) + 0.1
    assert acc == pytest.approx(float((m(features=feats)["logits"].argmax(1) == cls).float().mean()))
    assert m.refit_task_head(scores[:, keep], cls, method="lstsq") > majority + 0.1
    with pytest.raises(ValueError):
        m.refit_task_head(scores, cls)


def test_atlas_with_labels_ties_prototypes_to_images_with_their_concept(bundle, derm):
    pv, feats, y, _ = derm
    m = _model(bundle)
    n = 10
    lab = y[:n].clone()
    lab[:, 1] = 0  # concept 1 labelled on no image: its prototypes fall back to all images
    ids = [f"img{i}" for i in range(n)]
    atlas = m.build_atlas([(ids[:6], feats[:6], lab[:6]), (ids[6:], feats[6:n], lab[6:])], features=True)
    free = m.build_atlas([(ids, feats[:n])], features=True, store=False)
    assert m.atlas == atlas and len(atlas) == m.n_prototypes and all(e["concept_labelled"] is None for e in free)
    maps = m.similarity_maps(feats[:n]).detach().flatten(2).amax(-1)  # (n, P) each image's peak
    moved = 0
    for e, f in zip(atlas, free):
        j = m.proto_ids.tolist().index(e["prototype_id"])
        k = int(m.proto_concept[j])
        on = lab[:, k] > 0
        i = int(e["image_id"][3:])
        assert e["concept_labelled"] == bool(on.any()) and bool(on[i]) == e["concept_labelled"]
        pool = maps[on, j] if on.any() else maps[:, j]  # the best peak among the allowed images
        assert e["similarity"] == pytest.approx(float(pool.max()), abs=1e-5)
        moved += e["image_id"] != f["image_id"]
    assert any(not e["concept_labelled"] for e in atlas) and moved > 0  # both branches ran, and labels mattered


def test_save_load_round_trip_is_bitwise(bundle, derm, tmp_path):
    pv, feats = derm[0][:3], derm[1][:3]
    m = _model(bundle)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.01 * torch.randn_like(p))
    m.add_concept_by_text(bundle, "milia-like cysts")
    m.build_atlas([(["a", "b", "c"], pv)])
    m.prune_prototypes([4, 7])
    path = m.save(tmp_path / "csr.safetensors", extra={"steps": 3})
    info = json.loads(path.with_suffix(".json").read_text())
    assert info["steps"] == 3 and info["n_prototypes"] == m.n_prototypes and info["config"]["concepts"][-1] == "milia-like cysts"
    back = CSRModel.load(bundle, path)
    a, b = m.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    assert back.concepts == m.concepts and back.classes == m.classes and back.config == m.config
    assert back.atlas == m.atlas and len(back.atlas) == m.n_prototypes
    o1, o2 = m.eval()(features=feats), back(features=feats)
    assert all(torch.equal(o1[k], o2[k]) for k in o1)
    # a fine-tuned backbone travels in the file
    ft = _model(bundle, finetune_backbone=True)
    with torch.no_grad():
        ft.backbone.encoder.layers[-1].mlp.fc2.weight.add_(0.1)
    back = CSRModel.load(bundle, ft.save(tmp_path / "ft.safetensors"))
    assert torch.equal(back.backbone.encoder.layers[-1].mlp.fc2.weight, ft.backbone.encoder.layers[-1].mlp.fc2.weight)
    assert torch.equal(back(pv)["logits"], ft(pv)["logits"])
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"), metadata={"format": "nope"})
    with pytest.raises(ValueError, match="not a clinlens CSR model"):
        CSRModel.load(bundle, tmp_path / "other.safetensors")


def test_short_training_improves_concept_auroc(bundle, derm):
    _, feats, y, cls = derm
    tr, te = slice(0, 60), slice(60, 90)
    m = _model(bundle, seed=3)
    with torch.no_grad():
        o = m(features=feats[te])
    before_cam, before_sim = _auroc(o["concept_logits"], y[te]), _auroc(o["concept_scores"], y[te])
    opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    m.train()
    for _ in range(60):
        opt.zero_grad()
        loss = m.losses(y[tr], cls[tr], features=feats[tr])
        loss["total"].backward()
        opt.step()
    m.eval()
    with torch.no_grad():
        o = m(features=feats[te])
        acc = float((m(features=feats[tr])["logits"].argmax(1) == cls[tr]).float().mean())
        test_acc = float((o["logits"].argmax(1) == cls[te]).float().mean())
    after_cam, after_sim = _auroc(o["concept_logits"], y[te]), _auroc(o["concept_scores"], y[te])
    print(f"held-out concept AUROC: CAM {before_cam:.3f} -> {after_cam:.3f}; prototype {before_sim:.3f} -> {after_sim:.3f};"
          f" class accuracy train {acc:.2f} held-out {test_acc:.2f}")
    assert after_cam > before_cam + 0.1 and after_cam > 0.65
    assert after_sim > before_sim + 0.05
    assert acc > 0.5 and test_acc > 0.5  # 3 classes


def test_firing_rates_count_the_peaks_on_the_region():
    from clinlens.models.csr import CSRModel

    maps = torch.zeros(4, 3, 14, 14)
    maps[:, 0, 0, 0] = 1.0           # prototype 0 peaks in the corner on every image
    maps[:2, 1, 0, 1] = 1.0          # prototype 1 there on half of them, elsewhere on the rest
    maps[2:, 1, 9, 9] = 1.0
    maps[:, 2, 7, 7] = 1.0           # prototype 2 never
    cells = torch.zeros(4, 14, 14, dtype=torch.bool)
    cells[:, :2, :2] = True
    rates = CSRModel.firing_rates_from_maps(maps, cells)
    assert rates.tolist() == [1.0, 0.5, 0.0]
    assert CSRModel.firing_rates_from_maps(maps[:0], cells[:0]).tolist() == [0.0, 0.0, 0.0]


def _region_masks(n: int, size: int = 96) -> torch.Tensor:
    """(n, K, size, size) concept masks of the derm fixture's phantoms, as a clinician's drawn regions."""
    out = torch.zeros(n, len(DERM_CONCEPTS), size, size)
    for i in range(n):
        masks = make_derm(i, size=size).masks
        for k, c in enumerate(DERM_CONCEPTS):
            if c in masks:
                out[i, k] = torch.as_tensor(masks[c], dtype=torch.float32)
    return out


def test_region_loss_is_the_maps_softmax_mass_in_the_drawn_region(bundle, derm):
    m = _model(bundle, seed=1)
    f = derm[1][:3]
    grid = torch.zeros(3, len(DERM_CONCEPTS), 14, 14)
    grid[0, 2, 3:7, 4:9] = 1
    grid[2, 4, 8:10, 1:3] = 0.5  # partial coverage still counts as touched
    _, drawn = m.concept_vectors(f, m.cams(f), grid)
    v, _ = m.concept_vectors(f, m.cams(f), grid)
    got = m.region_loss(f, grid, drawn, v)
    maps = m.similarity_maps(f).flatten(2)
    tau, gam = m.config["region_temperature"], m.config["gamma"]
    terms = []
    for b, k in ((0, 2), (2, 4)):
        cols = (m.proto_concept == k).nonzero().flatten()
        inside = grid[b, k].flatten() > 0
        p = (maps[b, cols] / tau).softmax(-1)  # (M, hw)
        per = -torch.log(p[:, inside].sum(-1))
        q = (gam * (m.project(v[b, k]) @ F.normalize(m.prototypes[cols], dim=-1).T)).softmax(-1)
        terms.append((q * per).sum())
    assert torch.allclose(got, torch.stack(terms).mean(), atol=1e-5)
    # region_mode="concept": once per concept, on its map soft-assigned over its prototypes patch by patch
    mc = _model(bundle, seed=1, region_mode="concept")
    maps_c = mc.similarity_maps(f).flatten(2)
    terms_c = []
    for b, k in ((0, 2), (2, 4)):
        sk = maps_c[b, (mc.proto_concept == k).nonzero().flatten()]  # (M, hw)
        ck = ((mc.config["gamma"] * sk).softmax(0) * sk).sum(0)
        terms_c.append(-torch.log((ck / tau).softmax(-1)[grid[b, k].flatten() > 0].sum()))
    assert torch.allclose(mc.region_loss(f, grid, drawn, v), torch.stack(terms_c).mean(), atol=1e-5)
    # weight 0 turns it off; no drawn region gives no term
    y = torch.zeros(3, len(DERM_CONCEPTS))
    assert m.losses(y, features=f)["region"] == 0
    assert m.losses(y, features=f, region_masks=grid)["region"] > 0
    assert _model(bundle, region_weight=0.0).losses(y, features=f, region_masks=grid)["region"] == 0
    with pytest.raises(ValueError, match="region_mode"):
        _model(bundle, region_mode="pixel")


def test_drawn_regions_teach_the_maps_to_peak_inside_them(bundle, derm):
    """Same training with and without the region loss: held-out concept maps peak on the concept's mask more often."""
    _, feats, y, cls = derm
    regions = _region_masks(90)
    tr, te = slice(0, 60), slice(60, 90)

    def pointing(weight):
        m = _model(bundle, seed=2, region_weight=weight)
        opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=1e-2)
        m.train()
        for _ in range(60):
            opt.zero_grad()
            m.losses(y[tr], cls[tr], features=feats[tr], region_masks=regions[tr])["total"].backward()
            opt.step()
        m.eval()
        with torch.no_grad():
            maps = m.similarity_maps(feats[te]).flatten(2)
        cov = m.region_weights(regions[te]).flatten(2) > 0  # (n, K, hw)
        hit = n = 0
        for i in range(maps.shape[0]):
            for k in range(len(DERM_CONCEPTS)):
                if cov[i, k].any():
                    cols = (m.proto_concept == k).nonzero().flatten()
                    hit += int(cov[i, k, maps[i, cols].amax(0).argmax()])
                    n += 1
        return hit / n

    without, with_loss = pointing(0.0), pointing(1.0)
    print(f"held-out pointing without the region loss {without:.3f}, with it {with_loss:.3f}")
    assert with_loss > without + 0.05


def test_train_csr_fine_tunes_its_own_backbone(bundle, tmp_path):
    """`finetune_backbone=True`: train_csr encodes each batch with the model's own copy of the vision tower,
    trains it at `backbone_lr` (the shared CLIP untouched), and scores, atlas and file follow the trained copy."""
    from clinlens.data.phantoms import CHEST_DIAGNOSES, CHEST_FINDINGS
    from clinlens.trainers.concepts import encode, fit_csr, phantom_concept_items, pixel_batches, train_csr

    items = phantom_concept_items("chest", 0, 12, drawn=True)
    shared = {k: v.clone() for k, v in bundle.model.vision_model.state_dict().items()}
    kw = dict(steps=3, batch=4, progress=False, log=lambda *_: None, finetune_backbone=True, n_prototypes=2)
    summ = train_csr(bundle, items, tmp_path / "ft.safetensors", CHEST_FINDINGS, CHEST_DIAGNOSES, backbone_lr=1e-3, **kw)
    assert summ["backbone_lr"] == 1e-3
    assert all(torch.equal(v, shared[k]) for k, v in bundle.model.vision_model.state_dict().items())
    m = CSRModel.load(bundle, tmp_path / "ft.safetensors")
    tuned = m.backbone.state_dict()
    assert any(not torch.equal(tuned[k], shared[k]) for k in shared)
    # the atlas comes from the trained backbone's features
    pixels = torch.cat([pv for _, pv in pixel_batches(bundle, items)])
    maps = m.similarity_maps(encode(m, pixels)).flatten(2)
    ids = [it[0] for it in items]
    for e in m.atlas:
        j = int((m.proto_ids == e["prototype_id"]).nonzero())
        r, c = e["patch"]
        got = float(maps[ids.index(e["image_id"]), j, r * m.grid[1] + c])
        assert got == pytest.approx(e["similarity"], abs=1e-4)
    # backbone_lr 0 leaves the copy as the CLIP's; a tuned model cannot train on cached features
    train_csr(bundle, items, tmp_path / "still.safetensors", CHEST_FINDINGS, CHEST_DIAGNOSES, backbone_lr=0.0, **kw)
    still = CSRModel.load(bundle, tmp_path / "still.safetensors").backbone.state_dict()
    assert all(torch.equal(still[k], shared[k]) for k in shared)
    with pytest.raises(ValueError, match="trains on pixels"):
        fit_csr(m, None, torch.zeros(2, len(CHEST_FINDINGS)), torch.zeros(2, dtype=torch.long),
                torch.zeros(2, len(CHEST_FINDINGS), 224, 224), steps=1, batch=2, lr=1e-3)


def test_patch_features_match_the_hf_vision_forward(bundle):
    """`patch_features` runs the tower block by block (so a model can cache its frozen trunk): the post-LN
    patch tokens equal the Hugging Face forward's exactly, at the CLIP's input and at a larger one."""
    vm = bundle.model.vision_model
    for s in (224, 448):
        pv = torch.randn(2, 3, s, s, generator=torch.Generator().manual_seed(s))
        with torch.no_grad():
            ref = vm.post_layernorm(vm(pixel_values=pv, interpolate_pos_encoding=s != 224).last_hidden_state[:, 1:])
            got = patch_features(vm, pv)
        g = s // 16
        assert got.shape == (2, 128, g, g)
        assert torch.equal(got.flatten(2).transpose(1, 2), ref)


def test_train_csr_tunes_only_the_last_blocks(bundle, tmp_path):
    """`tuned_blocks=k`: only the last k blocks (and the post-LN) of the model's own tower train, from the
    frozen trunk's cached output; the trunk stays the CLIP's, the file keeps k, and the features of the
    split path equal a plain forward through the tuned tower. k outside 1..L is refused by name."""
    from clinlens.data.phantoms import CHEST_DIAGNOSES, CHEST_FINDINGS
    from clinlens.trainers.concepts import phantom_concept_items, pixel_batches, train_csr

    items = phantom_concept_items("chest", 0, 8, drawn=True)
    vm = bundle.model.vision_model
    summ = train_csr(bundle, items, tmp_path / "k1.safetensors", CHEST_FINDINGS, CHEST_DIAGNOSES, steps=3, batch=4,
                     progress=False, log=lambda *_: None, finetune_backbone=True, tuned_blocks=1, backbone_lr=1e-2,
                     n_prototypes=2)
    assert summ["backbone_lr"] == 1e-2
    m = CSRModel.load(bundle, tmp_path / "k1.safetensors")
    assert m.config["tuned_blocks"] == 1 and m.trunk_blocks == len(vm.encoder.layers) - 1
    same = lambda a, b: all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))  # noqa: E731
    assert same(m.backbone.embeddings, vm.embeddings)
    assert all(same(m.backbone.encoder.layers[i], vm.encoder.layers[i]) for i in range(m.trunk_blocks))
    assert not same(m.backbone.encoder.layers[-1], vm.encoder.layers[-1])
    assert not any(p.requires_grad for p in m.backbone.encoder.layers[0].parameters())
    assert all(p.requires_grad for p in m.backbone.encoder.layers[-1].parameters())
    pixels = next(pixel_batches(bundle, items[:2]))[1]
    with torch.no_grad():
        assert torch.allclose(m.features(pixels), patch_features(m.backbone, pixels), atol=1e-5)
    for bad in (0, len(vm.encoder.layers) + 1):
        with pytest.raises(ValueError, match="tuned_blocks must be in 1..6"):
            _model(bundle, finetune_backbone=True, tuned_blocks=bad)


def test_input_size_gives_a_finer_patch_grid(bundle, derm, tmp_path):
    """`input_size` runs the ViT at another input (interpolated position embeddings): 448 px -> 28x28
    patches; pixels at another size are resized to it; boxes and the atlas live on that input."""
    pv = derm[0][:2]
    m = _model(bundle, input_size=448)
    assert m.image_size == 448 and m.grid == (28, 28) and m.config["input_size"] == 448
    big = bundle.pixel_values(make_derm(0, size=96).image.astype(np.float32) / 255, 448)
    assert big.shape[-2:] == (448, 448)
    with torch.no_grad():
        f = m.features(pv)
        assert f.shape == (2, 128, 28, 28)
        assert torch.allclose(f[:1], m.features(F.interpolate(pv[:1], size=(448, 448), mode="bilinear",
                                                                align_corners=False)), atol=1e-5)
        assert not torch.allclose(f.mean((2, 3)), _model(bundle).features(pv).mean((2, 3)), atol=1e-3)
        out = m(pv, pos_boxes=[[0, 0, 224, 224]], alpha=0.0)
    assert out["sim_maps"].shape[-2:] == (28, 28)
    assert out["importance"][0, 0, :14, :14].eq(1).all() and out["importance"][0, 0, 14:].eq(0).all()
    m.build_atlas([(["a", "b"], pv)])
    assert all(0 <= v <= 448 and v % 16 == 0 for e in m.atlas for v in e["box"])
    back = CSRModel.load(bundle, m.save(tmp_path / "big.safetensors"))
    assert back.image_size == 448 and back.grid == (28, 28)
    with torch.no_grad():
        assert torch.equal(back(pv)["logits"], m(pv)["logits"])
    with pytest.raises(ValueError, match="multiple of the patch size"):
        _model(bundle, input_size=450)
