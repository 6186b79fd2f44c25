"""The committed default CLIP recognises findings zero-shot on held-out phantoms (coarse bound)."""
import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from clinlens.data.pairs import PairSet, add_phantom
from clinlens.data.phantoms import CHEST_FINDINGS
from clinlens.models.clip import load_clip
from clinlens.models.zeroshot import ZeroShotScorer


def test_default_beats_chance_on_held_out_chest_phantoms():
    bundle = load_clip(device="cpu")
    ps, rng = PairSet(), np.random.default_rng(0)
    for i in range(80):
        add_phantom(ps, "chest", 77_000_000 + i, bundle.image_size, rng, crops=0)
    with torch.no_grad():
        p = ZeroShotScorer(bundle, CHEST_FINDINGS)(bundle.pixel_values(ps.array().astype(np.float32) / 255)).numpy()
    aucs = {}
    for j, f in enumerate(CHEST_FINDINGS):
        y = np.array([lab[f] for lab in ps.labels])
        if 0 < y.sum() < len(y):
            aucs[f] = roc_auc_score(y, p[:, j])
    # coarse bounds (chance is 0.5); the full table is benchmarks/results/zeroshot_findings.md
    assert len(aucs) >= 4 and np.mean(list(aucs.values())) > 0.58 and aucs["cardiomegaly"] > 0.8, aucs


def test_negation_flips_the_answer():
    """Scoring "no f" must give the complement of scoring "f" (both are in the same softmax)."""
    bundle = load_clip(device="cpu")
    x = bundle.pixel_values(np.random.default_rng(0).random((2, 112, 112, 3)).astype(np.float32))
    with torch.no_grad():
        pos = ZeroShotScorer(bundle, ["pleural effusion"])(x)
        neg = ZeroShotScorer(bundle, ["pleural effusion"], positive=("no {}.", "no evidence of {}.", "{} is absent."),
                             negative=("{}.", "there is {}.", "{} is present."))(x)
    assert torch.allclose(pos + neg, torch.ones_like(pos), atol=1e-5)


def test_negated_prompts_rank_the_images_without_the_finding_first():
    """ "no cardiomegaly" (and other negation cues) is scored from the affirmed finding's evidence:
    its probability is the complement and it ranks held-out phantoms in the reverse order."""
    from clinlens.data.phantoms import make_chest

    bundle = load_clip(device="cpu")
    samples = [make_chest(81_000 + i, size=224) for i in range(16)]
    x = bundle.pixel_values(np.stack([s.image for s in samples]).astype(np.float32)[..., None].repeat(3, -1) / 255)
    prompts = ["cardiomegaly", "no cardiomegaly", "free of cardiomegaly", "no evidence of cardiomegaly"]
    with torch.no_grad():
        p = ZeroShotScorer(bundle, prompts)(x).numpy()
    for j in (1, 2, 3):
        np.testing.assert_allclose(p[:, j], 1 - p[:, 0], atol=1e-5)
    has = np.array([s.concepts["cardiomegaly"] for s in samples], bool)
    assert has.any() and (~has).any()
    assert p[~has, 1].mean() > p[has, 1].mean()  # "no cardiomegaly" prefers the images without it
    with pytest.raises(ValueError):
        ZeroShotScorer(bundle, ["  "])
