"""Active-learning selection core: which unlabelled images a clinician should label next.

Pure numpy/torch; nothing here knows MONAI Label (the adapters wrap these functions).

- **Scores** (higher = more worth labelling unless noted):
  - `region_uncertainty`: disagreement of the region model under prompt jitter, 1 − mean pairwise
    Dice of its masks (0 = stable). Without a user prompt it prompts itself (`auto_prompt`).
  - `predictive_entropy`: class-probability entropy / log C, in [0, 1] (the classifier's uncertainty).
  - `concept_margin`: CSR top-2 class-probability margin; *lower* = more ambiguous, and below
    `AMBIGUOUS_MARGIN` (0.3, CSR's "ask a doctor" threshold) the case is ambiguous.
- **Diversity**: `kcenter_greedy`, the greedy k-center core-set (Sener & Savarese, ICLR 2018) on
  L2-normalised CLIP image embeddings.
- **Strategies** (`rank`): random, uncertainty, ambiguity, diversity, hybrid (see `rank`).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

AMBIGUOUS_MARGIN = 0.3
STRATEGIES = ("random", "uncertainty", "ambiguity", "diversity", "hybrid")
HYBRID_POOL = 3  # hybrid: k-center among the top HYBRID_POOL * k by combined rank score


# ---------------------------------------------------------------------------------------------- region
def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two bool masks; two empty masks agree (1.0)."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    s = int(a.sum()) + int(b.sum())
    return 1.0 if s == 0 else 2.0 * int(np.logical_and(a, b).sum()) / s


def central_box(hw, frac: float = 0.6) -> list[float]:
    """Half-open [x0, y0, x1, y1] box covering the middle `frac` of each side of an (H, W) image."""
    H, W = hw
    mx, my = W * (1 - frac) / 2, H * (1 - frac) / 2
    return [float(np.floor(mx)), float(np.floor(my)), float(np.ceil(W - mx)), float(np.ceil(H - my))]


def _parse_prompt(prompt) -> dict:
    """None | box (4,) | foreground points (N, 2) | dict(box=, fg_xy=, bg_xy=) -> dict(box, fg, bg)."""
    if isinstance(prompt, dict):
        box = prompt.get("box")
        fg = np.asarray(prompt.get("fg_xy", prompt.get("fg", ())), float).reshape(-1, 2)
        bg = np.asarray(prompt.get("bg_xy", prompt.get("bg", ())), float).reshape(-1, 2)
        return {"box": None if box is None else np.asarray(box, float).reshape(4), "fg": fg, "bg": bg}
    arr = np.asarray(prompt, float)
    if arr.shape == (4,):
        return {"box": arr, "fg": np.zeros((0, 2)), "bg": np.zeros((0, 2))}
    if arr.ndim == 2 and arr.shape[1] == 2 and len(arr):
        return {"box": None, "fg": arr, "bg": np.zeros((0, 2))}
    raise ValueError(f"prompt must be a box [x0, y0, x1, y1], (N, 2) foreground points or a dict, got shape {arr.shape}")


def _jitter(p: dict, rng, px: float, hw) -> dict:
    """Every box edge and point coordinate moved by an independent U(-px, px), kept inside the image."""
    H, W = hw
    out = dict(p)
    if p["box"] is not None:
        b = p["box"] + rng.uniform(-px, px, 4)
        x0, x1 = np.clip(min(b[0], b[2]), 0, W - 1), np.clip(max(b[0], b[2]), 1, W)
        y0, y1 = np.clip(min(b[1], b[3]), 0, H - 1), np.clip(max(b[1], b[3]), 1, H)
        out["box"] = np.array([x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)])
    for k in ("fg", "bg"):
        if len(p[k]):
            q = p[k] + rng.uniform(-px, px, p[k].shape)
            out[k] = np.stack([np.clip(q[:, 0], 0, W - 1), np.clip(q[:, 1], 0, H - 1)], 1)
    return out


class _FreshWindow:
    """Each prediction starts from its own focus window, not from one an earlier click on this image left
    (so the score is reproducible); the caller's window for the image is restored afterwards."""

    def __init__(self, predictor, image_key, hw):
        self.predictor, self.key, self.hw = predictor, image_key, hw

    def reset(self):
        self.predictor.set_window(self.key, self.hw, None)

    def __enter__(self):
        self.saved = self.predictor.window(self.key, self.hw)
        return self

    def __exit__(self, *exc):
        self.predictor.set_window(self.key, self.hw, self.saved)


def _predict(predictor, image2d, image_key, p: dict) -> np.ndarray:
    box = None if p["box"] is None else [float(v) for v in p["box"]]
    return np.asarray(predictor.predict(image2d, image_key, fg_xy=p["fg"], bg_xy=p["bg"], box=box)["mask"], bool)


def auto_prompt(predictor, image2d, image_key, frac: float = 0.6) -> list[float]:
    """Prompt for an image nobody has clicked on: the box round the region the model segments when given
    the central box (`central_box(frac)`; phantom and dermoscopic lesions are centred), or the central
    box itself when that mask is empty. Jittering this box then asks "is the model sure what and where
    the main region is"."""
    hw = np.asarray(image2d).shape[:2]
    c = central_box(hw, frac)
    with _FreshWindow(predictor, image_key, hw) as fw:
        fw.reset()
        m = _predict(predictor, image2d, image_key, _parse_prompt(c))
    if not m.any():
        return c
    ys, xs = np.nonzero(m)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def region_uncertainty(predictor, image2d, image_key, prompt_box_or_points=None, n: int = 6,
                       jitter_px: float = 4, seed=0) -> float:
    """1 − mean pairwise Dice of the `RegionPredictor` masks over `n` prompts (0 = stable, 1 = no overlap).

    Run 0 uses the prompt as given, runs 1..n-1 a jittered copy (each box edge / point coordinate moved
    by U(−jitter_px, jitter_px) pixels). `prompt_box_or_points`: a half-open box [x0, y0, x1, y1],
    (N, 2) foreground (x, y) points, a dict(box=, fg_xy=, bg_xy=), or None for an unlabelled image
    (then `auto_prompt`). n=1 or jitter_px=0 gives 0.0 (the predictor is deterministic).
    """
    image2d = np.asarray(image2d)
    hw = image2d.shape[:2]
    if prompt_box_or_points is None:
        prompt_box_or_points = auto_prompt(predictor, image2d, image_key)
    base = _parse_prompt(prompt_box_or_points)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    rng = np.random.default_rng(seed)
    masks = []
    with _FreshWindow(predictor, image_key, hw) as fw:
        for j in range(n):
            fw.reset()
            p = base if j == 0 or jitter_px <= 0 else _jitter(base, rng, float(jitter_px), hw)
            masks.append(_predict(predictor, image2d, image_key, p))
    if n == 1:
        return 0.0
    d = [dice(masks[i], masks[j]) for i in range(n) for j in range(i + 1, n)]
    return float(np.clip(1.0 - np.mean(d), 0.0, 1.0))


# ---------------------------------------------------------------------------------------------- classifier
def _probs2d(probs) -> np.ndarray:
    p = np.asarray(probs, float)
    p = p[None] if p.ndim == 1 else p
    if p.ndim != 2 or p.shape[1] < 1:
        raise ValueError(f"probs must be (N, C), got shape {np.asarray(probs).shape}")
    if p.shape[1] == 1:  # one sigmoid output: p(class 1)
        p = np.concatenate([1 - p, p], 1)
    return p


def concept_margin(probs) -> np.ndarray:
    """Top-1 minus top-2 class probability per image, (N,); < `AMBIGUOUS_MARGIN` = ambiguous."""
    p = np.sort(_probs2d(probs), axis=1)
    return p[:, -1] - p[:, -2]


def predictive_entropy(probs) -> np.ndarray:
    """Entropy of the class probabilities over log C, (N,) in [0, 1] (1 = uniform)."""
    p = _probs2d(probs)
    p = p / np.clip(p.sum(1, keepdims=True), 1e-12, None)
    h = -(p * np.log(np.clip(p, 1e-12, None))).sum(1)
    return np.clip(h / np.log(p.shape[1]), 0.0, 1.0)


# ---------------------------------------------------------------------------------------------- diversity
def _normalise(x) -> np.ndarray:
    x = np.asarray(x, np.float64)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be (N, D), got shape {x.shape}")
    return x / np.clip(np.linalg.norm(x, axis=1, keepdims=True), 1e-12, None)


def kcenter_greedy(embeddings, k: int, selected_idx: Sequence[int] = ()) -> list[int]:
    """Greedy k-center core-set: repeatedly take the point farthest (Euclidean on L2-normalised rows)
    from everything selected so far. `selected_idx` (e.g. the labelled images) count as selected and are
    never returned; with none, the first pick is the point farthest from the mean direction. Returns up
    to k new indices in pick order; ties go to the lower index (deterministic)."""
    x = _normalise(embeddings)
    n = len(x)
    sel = sorted({int(i) for i in selected_idx})
    if any(i < 0 or i >= n for i in sel):
        raise ValueError(f"selected_idx out of range for {n} embeddings")
    k = max(0, min(int(k), n - len(sel)))
    taken = np.zeros(n, bool)
    taken[sel] = True
    if sel:
        mind = np.full(n, np.inf)
        for i in range(0, len(sel), 1024):  # |a - b|^2 = 2 - 2 a.b on unit rows
            d = np.clip(2.0 - 2.0 * x @ x[sel[i:i + 1024]].T, 0.0, None)
            mind = np.minimum(mind, d.min(1))
    else:
        mind = ((x - x.mean(0)) ** 2).sum(1)
    out = []
    for _ in range(k):
        cand = np.where(taken, -np.inf, mind)
        j = int(np.argmax(cand))
        out.append(j)
        taken[j] = True
        mind = np.minimum(mind, np.clip(2.0 - 2.0 * x @ x[j], 0.0, None))
    return out


# ---------------------------------------------------------------------------------------------- strategies
def _rank01(v: np.ndarray) -> np.ndarray:
    """Average-tie ranks scaled to [0, 1] (1 = largest); a single element gets 1."""
    v = np.asarray(v, float)
    if len(v) <= 1:
        return np.ones(len(v))
    order = np.argsort(v, kind="stable")
    r = np.empty(len(v))
    r[order] = np.arange(len(v), dtype=float)
    for u in np.unique(v):  # ties share their mean rank
        m = v == u
        if m.sum() > 1:
            r[m] = r[m].mean()
    return r / (len(v) - 1)


def _top(values: np.ndarray, idx: np.ndarray, k: int) -> list[int]:
    """The k indices of `idx` with the largest `values` (values aligned with idx); ties: lower index."""
    order = np.lexsort((idx, -values))
    return [int(i) for i in idx[order[:k]]]


def _score(scores: dict, name: str, n: int) -> np.ndarray:
    if name == "uncertainty":
        if "uncertainty" in scores:
            v = scores["uncertainty"]
        elif "probs" in scores:
            v = predictive_entropy(scores["probs"])
        else:
            raise ValueError("strategy needs scores['uncertainty'] (or scores['probs'])")
    else:  # ambiguity: -margin, so larger = more ambiguous
        if "margin" in scores:
            v = -np.asarray(scores["margin"], float)
        elif "probs" in scores:
            v = -concept_margin(scores["probs"])
        else:
            raise ValueError("strategy needs scores['margin'] (or scores['probs'])")
    v = np.asarray(v, float).reshape(-1)
    if len(v) != n:
        raise ValueError(f"scores[{name!r}] has {len(v)} entries for {n} images")
    return np.nan_to_num(v, nan=-np.inf)


def rank(strategy: str, scores: dict[str, np.ndarray], k: int, labelled_mask, embeddings=None,
         seed=0) -> list[int]:
    """The next (up to) k images to label, best first; labelled images are never returned.

    `scores` (arrays over all N images): "uncertainty" (higher = less sure; e.g. `predictive_entropy`
    or `region_uncertainty`), "margin" (`concept_margin`; lower = more ambiguous), or just "probs"
    (N, C) from which both are derived. `embeddings` (N, D): CLIP image embeddings.

    - random: a uniform sample (numpy Generator seeded by `seed`).
    - uncertainty: highest uncertainty first.
    - ambiguity: lowest top-2 margin first (the cases below `AMBIGUOUS_MARGIN` a doctor should see).
    - diversity: `kcenter_greedy` on the embeddings, the labelled images counting as selected.
    - hybrid: h = (rank01(uncertainty) + rank01(−margin)) / 2 over the unlabelled images (rank01 maps
      ranks to [0, 1]); the top `HYBRID_POOL`·k by h are the candidates, and k-center greedy picks k of
      them relative to the labelled set, so the batch is informative *and* not redundant. Without
      embeddings: the top k by h.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose from {list(STRATEGIES)}")
    lab = np.asarray(labelled_mask, bool).reshape(-1)
    n = len(lab)
    unl = np.flatnonzero(~lab)
    k = max(0, min(int(k), len(unl)))
    if k == 0:
        return []
    if embeddings is not None and len(embeddings) != n:
        raise ValueError(f"{len(embeddings)} embeddings for {n} images")
    if strategy == "random":
        return [int(i) for i in np.random.default_rng(seed).permutation(unl)[:k]]
    if strategy == "diversity":
        if embeddings is None:
            raise ValueError("the diversity strategy needs embeddings")
        return kcenter_greedy(embeddings, k, np.flatnonzero(lab))
    if strategy == "uncertainty":
        return _top(_score(scores, "uncertainty", n)[unl], unl, k)
    if strategy == "ambiguity":
        return _top(_score(scores, "ambiguity", n)[unl], unl, k)
    # hybrid
    h = (_rank01(_score(scores, "uncertainty", n)[unl]) + _rank01(_score(scores, "ambiguity", n)[unl])) / 2
    if embeddings is None:
        return _top(h, unl, k)
    cand = np.array(_top(h, unl, min(HYBRID_POOL * k, len(unl))))
    labelled = np.flatnonzero(lab)
    sub = np.concatenate([labelled, cand])
    picks = kcenter_greedy(np.asarray(embeddings)[sub], k, range(len(labelled)))
    return [int(sub[j]) for j in picks]
