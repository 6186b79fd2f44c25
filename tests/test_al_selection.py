"""Active-learning selection core: k-center, margins, strategies and region uncertainty on a real predictor."""
import numpy as np
import pytest
import torch

from clinlens.activelearning.selection import (AMBIGUOUS_MARGIN, STRATEGIES, auto_prompt, concept_margin,
                                               kcenter_greedy, predictive_entropy, rank, region_uncertainty)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def clusters(seed=0):
    """Cluster A (0-5) round e0, B (6-8) round -e0 (far from A), C (9-11) round e1 (between)."""
    rng = np.random.default_rng(seed)
    e = np.eye(8)
    rows = [e[0] + 0.05 * rng.standard_normal(8) for _ in range(6)]
    rows += [-e[0] + 0.05 * rng.standard_normal(8) for _ in range(3)]
    rows += [e[1] + 0.05 * rng.standard_normal(8) for _ in range(3)]
    return np.array(rows)


def test_kcenter_picks_far_cluster_first_and_never_repeats():
    x = clusters()
    a = list(range(6))
    picks = kcenter_greedy(x, 2, selected_idx=a)
    assert picks[0] in (6, 7, 8)  # the cluster opposite the labelled one
    assert picks[1] in (9, 10, 11)  # then the one not yet covered, not B again
    # L2-normalised: row scales do not matter; deterministic
    scaled = x * np.random.default_rng(1).uniform(0.2, 5.0, (len(x), 1))
    assert kcenter_greedy(scaled, 2, selected_idx=a) == picks == kcenter_greedy(x, 2, selected_idx=a)
    allp = kcenter_greedy(x, 100, selected_idx=a)
    assert sorted(allp) == list(range(6, 12)) and len(set(allp)) == len(allp)
    assert kcenter_greedy(x, 3, selected_idx=range(12)) == []
    # no selection: the first pick is the point farthest from the mean direction (cluster B here)
    first = kcenter_greedy(x, 3)
    assert first[0] in (6, 7, 8) and len(set(first)) == 3
    # one labelled point of A: the two far clusters come first, one pick each
    assert sorted(i // 3 for i in kcenter_greedy(x, 2, selected_idx=[0])) == [2, 3]


def test_margin_entropy_and_ambiguity_ranking():
    p = np.array([[0.90, 0.05, 0.05],   # confident
                  [0.40, 0.35, 0.25],   # ambiguous, margin 0.05
                  [0.50, 0.50, 0.00],   # a tie, margin 0
                  [0.60, 0.20, 0.20],   # margin 0.4
                  [0.55, 0.30, 0.15]])  # margin 0.25
    m = concept_margin(p)
    assert np.allclose(m, [0.85, 0.05, 0.0, 0.4, 0.25])
    assert (m < AMBIGUOUS_MARGIN).tolist() == [False, True, True, False, True]
    assert np.allclose(concept_margin([[0.2], [0.5]]), [0.6, 0.0])  # one sigmoid output
    h = predictive_entropy(p)
    assert np.isclose(predictive_entropy([[1 / 3] * 3])[0], 1.0) and h.argmin() == 0 and h.argmax() == 1
    lab = np.zeros(5, bool)
    assert rank("ambiguity", {"probs": p}, 5, lab) == [2, 1, 4, 3, 0]
    assert rank("ambiguity", {"margin": m}, 2, lab) == [2, 1]
    assert rank("uncertainty", {"probs": p}, 2, lab) == [1, 4]
    lab[2] = True
    assert rank("ambiguity", {"margin": m}, 2, lab) == [1, 4]


def test_rank_excludes_labelled_and_rejects_unknown():
    rng = np.random.default_rng(0)
    n = 40
    emb = rng.standard_normal((n, 16))
    scores = {"probs": rng.dirichlet(np.ones(3), n)}
    lab = np.zeros(n, bool)
    lab[rng.choice(n, 15, replace=False)] = True
    for s in STRATEGIES:
        picks = rank(s, scores, 8, lab, embeddings=emb, seed=3)
        assert len(picks) == len(set(picks)) == 8 and not lab[picks].any(), s
        assert rank(s, scores, 100, lab, embeddings=emb) and len(rank(s, scores, 100, lab, embeddings=emb)) == 25
    assert rank("random", scores, 8, lab, seed=3) == rank("random", scores, 8, lab, seed=3)
    assert rank("random", scores, 8, lab, seed=3) != rank("random", scores, 8, lab, seed=4)
    # hybrid: k-center inside the 3k best by averaged rank of entropy and -margin
    from scipy.stats import rankdata

    unl = np.flatnonzero(~lab)
    h = rankdata(predictive_entropy(scores["probs"])[unl]) + rankdata(-concept_margin(scores["probs"])[unl])
    cand = set(unl[np.argsort(-h, kind="stable")[:12]].tolist())
    hyb = rank("hybrid", scores, 4, lab, embeddings=emb)
    assert set(hyb) <= cand and len(hyb) == 4
    assert rank("hybrid", scores, 4, lab) == unl[np.argsort(-h, kind="stable")[:4]].tolist()  # no embeddings
    assert rank("uncertainty", scores, 0, lab) == [] and rank("random", scores, 3, np.ones(n, bool)) == []
    with pytest.raises(ValueError, match="unknown strategy"):
        rank("entropy-ish", scores, 3, lab)
    with pytest.raises(ValueError, match="embeddings"):
        rank("diversity", scores, 3, lab)
    with pytest.raises(ValueError, match="margin"):
        rank("ambiguity", {"uncertainty": np.zeros(n)}, 3, lab)


@pytest.fixture(scope="module")
def predictor(bundle):
    from test_region_model import _randomise

    from clinlens.models.region_clip import RegionCLIP
    from clinlens.models.region_predictor import RegionPredictor

    torch.manual_seed(5)
    return RegionPredictor(_randomise(RegionCLIP(bundle.model, k=2), seed=7).eval(), bundle, max_grow=0)


def test_region_uncertainty_on_a_real_predictor(predictor):
    rng = np.random.default_rng(0)
    img = rng.random((160, 160, 3)).astype(np.float32) * 0.3
    img[50:110, 40:100] += 0.6  # a bright square
    box = [40, 50, 100, 110]
    assert region_uncertainty(predictor, img, "a", box, n=1) == 0.0
    assert region_uncertainty(predictor, img, "a", box, n=4, jitter_px=0) == 0.0
    assert region_uncertainty(predictor, img, "a", [(70, 80), (60, 90)], n=3, jitter_px=0) == 0.0
    # the user's current window for the image is left as it was
    predictor.predict(img, "a", fg_xy=[(10, 10)])
    before = dict(predictor._windows)
    u = region_uncertainty(predictor, img, "a", box, n=5, jitter_px=12, seed=1)
    assert 0.0 < u <= 1.0 and predictor._windows == before  # this random model does move under 12 px jitter
    assert u == region_uncertainty(predictor, img, "a", box, n=5, jitter_px=12, seed=1)  # reproducible
    up = region_uncertainty(predictor, img, "a", {"fg_xy": [(70, 80)], "bg_xy": [(5, 5)]}, n=4, jitter_px=8)
    assert 0.0 <= up <= 1.0
    # no user prompt: the box round what the model finds from the central box
    ap = auto_prompt(predictor, img, "a")
    assert len(ap) == 4 and 0 <= ap[0] < ap[2] <= 160 and 0 <= ap[1] < ap[3] <= 160
    assert 0.0 <= region_uncertainty(predictor, img, "a", None, n=4) <= 1.0
    with pytest.raises(ValueError):
        region_uncertainty(predictor, img, "a", [1, 2, 3], n=2)
