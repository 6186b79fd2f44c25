"""Negation fine-tuning: the CoN-CLIP (CON2) and CON1 losses, the batch builder, `train_negation` on
the tiny CLIP (frozen vision tower, tuned text tower, loadable published directory) and the
`negation` train task's option checks."""
import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from clinlens.data.phantoms import CHEST_FINDINGS, DERM_CONCEPTS
from clinlens.models.negation_tuning import NegationBatcher, con_clip_loss, contrastive_loss
from clinlens.text.negation import AFFIRMED, NEGATED, split_findings

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _ce_row(logits, target):
    return -logits[target] + math.log(sum(math.exp(v) for v in logits))


def _dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def test_con_clip_loss_matches_hand_computation():
    s = 3.0
    img = [[1.0, 0.0], [0.0, 1.0]]
    dis = [[0.0, 1.0], [1.0, 0.0]]
    cap = [[0.8, 0.6], [0.6, 0.8]]
    neg = [[0.0, 1.0], [1.0, 0.0]]
    texts, swapped = cap + neg, neg + cap
    l1 = sum(_ce_row([s * _dot(img[i], t) for t in texts], i) for i in range(2)) / 2
    l2 = sum(_ce_row([s * _dot(cap[i], x) for x in img], i) for i in range(2)) / 2
    l3 = sum(_ce_row([s * _dot(dis[i], t) for t in swapped], i) for i in range(2)) / 2
    want = (l1 + l2 + l3) / 3
    t = lambda v: torch.tensor(v)  # noqa: E731
    got = con_clip_loss(t(img), t(dis), t(cap), t(neg), s)
    assert got.item() == pytest.approx(want, rel=1e-6)
    # un-normalised inputs are normalised: scaling an embedding changes nothing
    assert con_clip_loss(2 * t(img), t(dis), 5 * t(cap), t(neg), s).item() == pytest.approx(want, rel=1e-6)
    # CON1 by hand: symmetric InfoNCE
    c1 = (sum(_ce_row([s * _dot(img[i], c) for c in cap], i) for i in range(2)) / 2
          + sum(_ce_row([s * _dot(cap[i], x) for x in img], i) for i in range(2)) / 2) / 2
    assert contrastive_loss(t(img), t(cap), s).item() == pytest.approx(c1, rel=1e-6)
    # identity positive masks give the paper's loss; an extra positive changes it
    eye2, eye4 = torch.eye(2, dtype=torch.bool), torch.eye(2, 4, dtype=torch.bool)
    assert con_clip_loss(t(img), t(dis), t(cap), t(neg), s, positives=(eye4, eye2, eye4)).item() == pytest.approx(want)
    more = eye4.clone()
    more[0, 3] = True
    soft = (sum(_ce_row([s * _dot(img[i], x) for x in texts], i) for i in range(2))
            - 0.5 * _ce_row([s * _dot(img[0], x) for x in texts], 0)
            + 0.5 * _ce_row([s * _dot(img[0], x) for x in texts], 3)) / 2
    assert con_clip_loss(t(img), t(dis), t(cap), t(neg), s, positives=(more, eye2, eye4)).item() == pytest.approx(
        (soft + l2 + l3) / 3, rel=1e-6)


def test_loss_is_lower_when_negated_captions_are_far_from_their_images():
    g = torch.Generator().manual_seed(0)
    b, d = 6, 16
    img = torch.nn.functional.normalize(torch.randn(b, d, generator=g), dim=-1)
    cap = img + 0.3 * torch.randn(b, d, generator=g)       # captions near their images
    dis = torch.randn(b, d, generator=g)
    far = -img + 0.3 * torch.randn(b, d, generator=g)      # "no f" pointing away from the image with f
    near = img + 0.3 * torch.randn(b, d, generator=g)      # "no f" as close as "f": the failure CON2 targets
    assert con_clip_loss(img, dis, cap, far, 10.0) < con_clip_loss(img, dis, cap, near, 10.0) - 0.1
    # distractors that match their negated caption lower it further
    assert con_clip_loss(img, -img, cap, far, 10.0) < con_clip_loss(img, dis, cap, far, 10.0)
    assert contrastive_loss(img, cap, 10.0) < contrastive_loss(img, cap.roll(1, 0), 10.0)


def test_batcher_captions_are_true_negations_false_and_distractors_lack_the_finding():
    rng = np.random.default_rng(3)
    presence = [dict(zip(CHEST_FINDINGS, rng.integers(0, 2, len(CHEST_FINDINGS)).tolist())) for _ in range(40)]
    presence += [dict(zip(DERM_CONCEPTS, rng.integers(0, 2, len(DERM_CONCEPTS)).tolist())) for _ in range(40)]
    presence += [{f: 0 for f in CHEST_FINDINGS}]  # a normal image: a distractor, never an anchor
    vocab = CHEST_FINDINGS + DERM_CONCEPTS
    batcher = NegationBatcher(presence, mixed_p=0.5, seed=1)
    assert len(presence) - 1 not in set(batcher.anchors.tolist())
    b = batcher.sample(48)
    assert len(b.captions) == len(b.negated) == len(b.images) == len(b.distractors) == 48
    mixed = 0
    for i, d, c, n, f, dc in zip(b.images, b.distractors, b.captions, b.negated, b.findings, b.distractor_captions):
        pi, pd = presence[i], presence[d]
        assert set(pi) == set(pd) and pi[f] == 1 and pd[f] == 0
        for text, true_of, false_of in ((c, pi, pd), (n, pd, pi)):
            found = split_findings(text, vocab)
            assert found, text
            for m in found:
                want = AFFIRMED if true_of[m.name] else NEGATED
                assert m.polarity == want, (text, true_of)
            assert any(m.polarity != (AFFIRMED if false_of[m.name] else NEGATED) for m in found), (text, false_of)
        for m in split_findings(dc, vocab):  # CON1's caption of the distractor is true of it
            assert m.polarity == (AFFIRMED if pd[m.name] else NEGATED), dc
        mixed += "but" in c
    assert 0 < mixed < 48
    # which texts are true of which images (the optional multi-positive targets)
    p1, p2, p3 = b.truth(presence)
    eye = torch.arange(48)
    assert p1.shape == p3.shape == (48, 96) and p2.shape == (48, 48)
    assert p1[eye, eye].all() and p2[eye, eye].all() and p3[eye, eye].all()
    assert not p1[eye, eye + 48].any() and not p3[eye, eye + 48].any()  # n_i false of x_i, c_i false of d_i
    assert p1.sum() > 48 and p3.sum() > 48  # in-batch texts that are also true: the paper counts them as negatives
    assert b.truth(presence, "con1").shape == (96, 96)


def _vision(state):
    return {k: v for k, v in state.items() if k.startswith(("vision_model.", "visual_projection."))}


def test_train_negation_freezes_vision_tunes_text_and_publishes(bundle, tmp_path):
    from clinlens.models.clip import load_clip
    from clinlens.trainers.negation import train_negation

    base = load_file(str(bundle.path / "model.safetensors"))
    out = tmp_path / "tuned"
    kw = dict(loss="con2", steps=4, batch=8, lr=1e-3, n_images=8, seed=0, device="cpu", progress=False,
              log=lambda *a: None)
    summary = train_negation(bundle.path, out, **kw)
    tuned = load_file(str(out / "model.safetensors"))
    assert set(tuned) == set(base)
    vision = _vision(base)
    assert len(vision) > 50 and all(torch.equal(tuned[k], v) for k, v in vision.items())
    text = [k for k in base if k.startswith(("text_model.", "text_projection."))]
    assert sum(not torch.equal(tuned[k], base[k]) for k in text) > len(text) // 2
    assert torch.equal(tuned["logit_scale"], base["logit_scale"])
    info = json.loads((out / "negation.json").read_text())
    assert info["loss"] == "con2" and info["steps"] == 4 and info == summary
    assert all(info["train_seeds"][f][1] <= 50_000_000 for f in info["train_seeds"])
    loaded = load_clip(out, device="cpu")   # a complete HF dir: config, weights, tokenizer
    with torch.no_grad():
        assert loaded.encode_texts(["no pleural effusion"]).shape == (1, bundle.model.config.projection_dim)
    assert not list(tmp_path.glob(".tuned_*"))  # published by rename, no temp dir left
    # deterministic for a seed on CPU; CON1 trains too and differs
    again = train_negation(bundle.path, tmp_path / "again", **kw)
    assert again["final_loss"] == summary["final_loss"]
    assert torch.equal(load_file(str(tmp_path / "again" / "model.safetensors"))["text_projection.weight"],
                       tuned["text_projection.weight"])
    con1 = train_negation(bundle.path, tmp_path / "con1", **{**kw, "loss": "con1"})
    assert con1["loss"] == "con1" and con1["final_loss"] != summary["final_loss"]
    with pytest.raises(ValueError, match="unknown loss"):
        train_negation(bundle.path, tmp_path / "bad", **{**kw, "loss": "con3"})
    assert not (tmp_path / "bad").exists()


def test_negation_task_options(bundle, tmp_path):
    from clinlens.data.conventions import RequestError
    from clinlens.models.clip import LazyClip, load_clip
    from clinlens.trainers.negation_task import NegationTrain

    task = NegationTrain(LazyClip({"clip_model": str(bundle.path)}, device="cpu"), tmp_path / "neg_clip")
    assert {"loss", "steps", "n_images"} <= set(task.info()["config"])
    with pytest.raises(RequestError, match="'loss' must be one of") as e:
        task({"loss": "infonce"}, None)
    assert e.value.status // 100 == 4
    with pytest.raises(RequestError, match="'steps' must be a number"):
        task({"steps": "many"}, None)
    with pytest.raises(RequestError, match="'n_images' must be in"):
        task({"n_images": 1}, None)
    assert not (tmp_path / "neg_clip").exists()
    summary = task({"loss": "CON1", "steps": "2", "n_images": 8, "batch": 4}, None)
    assert summary["loss"] == "con1" and summary["steps"] == 2
    assert task.stats()["status"] == "DONE" and task.stats()["out_dir"] == str(tmp_path / "neg_clip")
    load_clip(tmp_path / "neg_clip", device="cpu")
