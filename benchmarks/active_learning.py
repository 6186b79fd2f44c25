"""Active learning with a simulated clinician (`clinlens.activelearning.selection`).

Setup: a pool of unlabelled derm phantoms and a fixed held-out test set. Each round a strategy picks
K pool images; the oracle clinician supplies their class, concept labels and concept/lesion masks;
the models retrain from scratch and are scored on the test set. Strategies: random, uncertainty
(CSR predictive entropy), ambiguity (CSR top-2 margin), diversity (k-center on CLIP image
embeddings), hybrid (rank-averaged uncertainty + ambiguity, then k-center among the top 3K).

What is retrained each round (CPU-cheap; the frozen default CLIP's features are computed once):
- **Classification (primary curve, macro-F1):** a fresh CSR model (`CSRModel`, all four stages) by
  `fit_csr`, the loop `train_csr` runs (Adam, cosine schedule, `losses`, then `refit_task_head`), on
  the cached patch features instead of re-encoding the images (`train_csr` itself re-encodes every
  call and publishes a checkpoint). The oracle's concept masks enter as drawn regions (stage 2).
- **Segmentation (Dice):** retraining the region model (MedP-CLIP decoder on the trunk) per round is
  far too slow on CPU, so it is *not* in the loop. Instead a cheap per-round stand-in is retrained:
  a lesion patch probe (logistic regression from each frozen CLIP patch token to "is this 16 px patch
  mostly lesion"), upsampled bilinearly to the image and thresholded at 0.5; Dice against the
  lesion mask on the test set. It shows whether the classification-driven picks also help a
  segmenter trained on the same labels.
- **Region-uncertainty check (not in the loop):** `region_uncertainty` of the shipped region model
  on pool images (lesion-box prompt, 6 runs, 4 px jitter), with its Spearman correlation to the
  shipped model's 1 − Dice there, and the same for the prompt-free score (`auto_prompt`).

Writes benchmarks/results/active_learning.md, .json and .png (learning curves).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, header  # noqa: E402

from clinlens.activelearning.selection import (AMBIGUOUS_MARGIN, STRATEGIES, concept_margin, dice,  # noqa: E402
                                               predictive_entropy, rank, region_uncertainty)
from clinlens.data.image_io import to_unit_rgb  # noqa: E402
from clinlens.data.phantoms import make_derm, mask_box  # noqa: E402
from clinlens.models.clip import DEFAULT_CLIP_DIR, load_clip  # noqa: E402
from clinlens.models.csr import CSRModel, concept_text_embeddings  # noqa: E402
from clinlens.trainers.concepts import CSR_FAMILIES, DEFAULTS, _tensors, fit_csr, phantom_concept_items  # noqa: E402

FAMILY = "derm"
POOL_BASE = 31   # pool seeds 31 * 1_000_003 + 500_000 + i (shipped CLIP/CSR/region models: base 0)
TEST_BASE = 9    # the held-out test seeds of benchmarks/concepts.py
QUICK = dict(pool=48, test=30, init=6, k=6, rounds=2, seeds=1, steps=30, region_check=4)
ORDER = ("random",) + tuple(s for s in STRATEGIES if s != "random")


def phantom_seed(base: int, i: int) -> int:
    return base * 1_000_003 + 500_000 + i  # `phantom_concept_items`' convention


def load_set(bundle, model: CSRModel, base: int, n: int, oracle: bool, log) -> dict:
    """Cached frozen features, labels, drawn concept regions (patch grid) and lesion masks of n phantoms."""
    t0 = time.time()
    S = model.image_size
    samples = [make_derm(phantom_seed(base, i), size=S) for i in range(n)]
    # the items `phantom_concept_items` makes, built here from the same samples to keep their masks
    items = [(f"{FAMILY}_phantom_{phantom_seed(base, i)}", to_unit_rgb(s.image), dict(s.concepts), s.diagnosis, {})
             for i, s in enumerate(samples)]
    ref = phantom_concept_items(FAMILY, base, 1, S)[0]
    assert ref[0] == items[0][0] and np.array_equal(ref[1], items[0][1]) and ref[2:4] == items[0][2:4]
    out = {k: [] for k in ("feats", "y", "cls", "regions", "emb", "lesion_grid", "lesion")}
    for i in range(0, n, 32):
        part = items[i:i + 32]
        masks = [s.masks for s in samples[i:i + 32]]
        if oracle:  # the clinician's drawn concept regions
            part = [(it[0], it[1], it[2], it[3], {c: m[c] for c in model.concepts if c in m and it[2].get(c)})
                    for it, m in zip(part, masks)]
        f, y, c, r = _tensors(bundle, model, part)
        out["feats"].append(f)
        out["y"].append(y)
        out["cls"].append(c)
        out["regions"].append(F.adaptive_avg_pool2d(r, model.grid))  # what CSR's region_weights does anyway
        with torch.no_grad():
            out["emb"].append(bundle.encode_images(torch.cat([bundle.pixel_values(it[1]) for it in part])).cpu())
        les = torch.tensor(np.stack([m["lesion"] for m in masks]), dtype=torch.float32)
        out["lesion_grid"].append(F.adaptive_avg_pool2d(les[:, None], model.grid)[:, 0])
        out["lesion"].append(les.bool())
    res = {k: torch.cat(v) for k, v in out.items()}
    res["items"] = items
    log(f"{FAMILY} base {base}: {n} phantoms, features + embeddings {time.time() - t0:.1f}s")
    return res


def train_csr_cached(bundle, anchors, data, idx, steps: int, seed: int, batch: int = DEFAULTS["batch"],
                     lr: float = DEFAULTS["lr"]) -> CSRModel:
    """`fit_csr` on cached features of the labelled images `idx` (no re-encoding, no publishing)."""
    concepts, classes = CSR_FAMILIES[FAMILY]
    torch.manual_seed(seed)
    model = CSRModel(bundle.model, concepts, classes, anchors)
    idx = torch.as_tensor(idx, dtype=torch.long)
    fit_csr(model, *(data[k][idx] for k in ("feats", "y", "cls", "regions")), steps, batch, lr, seed)
    return model


def class_probs(model: CSRModel, feats) -> np.ndarray:
    with torch.no_grad():
        return torch.cat([model(features=feats[i:i + 64])["logits"].softmax(-1) for i in range(0, len(feats), 64)]).numpy()


def patch_rows(feats) -> np.ndarray:
    return feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1]).numpy()


def lesion_probe_dice(pool, idx, test) -> float:
    """Mean test Dice of a logistic-regression lesion patch probe trained on the labelled images' masks."""
    from sklearn.linear_model import LogisticRegression

    x = patch_rows(pool["feats"][idx])
    t = (pool["lesion_grid"][idx].reshape(-1) > 0.5).numpy()
    if t.all() or not t.any():
        return 0.0
    probe = LogisticRegression(C=0.1, max_iter=300).fit(x, t)
    n, _, h, w = test["feats"].shape
    p = probe.predict_proba(patch_rows(test["feats"]))[:, 1].reshape(n, 1, h, w)
    S = test["lesion"].shape[-1]
    up = F.interpolate(torch.tensor(p, dtype=torch.float32), size=(S, S), mode="bilinear", align_corners=False)[:, 0]
    pred = (up > 0.5).numpy()
    gt = test["lesion"].numpy()
    return float(np.mean([dice(a, b) for a, b in zip(pred, gt)]))


def evaluate(bundle, anchors, pool, test, idx, steps, seed) -> tuple[dict, np.ndarray]:
    from sklearn.metrics import f1_score

    model = train_csr_cached(bundle, anchors, pool, idx, steps, seed)
    pt = class_probs(model, test["feats"])
    yt = test["cls"].numpy()
    m = {"f1": float(f1_score(yt, pt.argmax(1), average="macro")), "accuracy": float((pt.argmax(1) == yt).mean()),
         "dice": lesion_probe_dice(pool, idx, test)}
    return m, class_probs(model, pool["feats"])


def run_seed(bundle, anchors, pool, test, a, seed: int, log) -> dict:
    """All strategies from one random initial labelled set (shared, so the comparison is paired)."""
    n = len(pool["cls"])
    init = np.random.default_rng(1000 + seed).choice(n, a.init, replace=False)
    m0, probs0 = evaluate(bundle, anchors, pool, test, init, a.steps, seed)
    out = {}
    for strat in ORDER:
        t0 = time.time()
        lab = np.zeros(n, bool)
        lab[init] = True
        curve, probs, picks = [dict(m0, labels=int(lab.sum()))], probs0, []
        for r in range(a.rounds):
            scores = {"uncertainty": predictive_entropy(probs), "margin": concept_margin(probs)}
            new = rank(strat, scores, a.k, lab, embeddings=pool["emb"].numpy(), seed=100 * seed + r)
            assert not lab[new].any() and len(set(new)) == len(new) == a.k
            lab[new] = True
            picks.append([int(i) for i in new])
            m, probs = evaluate(bundle, anchors, pool, test, np.flatnonzero(lab), a.steps, seed)
            curve.append(dict(m, labels=int(lab.sum()), ambiguous_picked=int((scores["margin"][new] < AMBIGUOUS_MARGIN).sum())))
        out[strat] = {"curve": curve, "picks": picks}
        log(f"seed {seed} {strat:11s}: F1 " + " ".join(f"{c['f1']:.3f}" for c in curve)
            + "  Dice " + " ".join(f"{c['dice']:.3f}" for c in curve) + f"  ({time.time() - t0:.0f}s)")
    return out


def labels_to_reach(labels, values, target) -> float | None:
    """First crossing of `target` on the piecewise-linear curve (labels, values); None if never."""
    for i, v in enumerate(values):
        if v >= target:
            if i == 0:
                return float(labels[0])
            v0, l0, l1 = values[i - 1], labels[i - 1], labels[i]
            return float(l0 + (target - v0) / (v - v0) * (l1 - l0))
    return None


def region_check(bundle, pool, n: int, log) -> dict:
    """Spearman correlation of `region_uncertainty` (shipped region model) with its 1 − Dice on pool images."""
    from scipy.stats import spearmanr

    from clinlens.models.region_predictor import RegionPredictor

    t0 = time.time()
    pred = RegionPredictor.from_bundle(bundle)
    rows = []
    for i, it in enumerate(pool["items"][:n]):
        gt = pool["lesion"][i].numpy()
        box = mask_box(gt)
        d = dice(pred.predict(it[1], it[0], box=box)["mask"], gt)
        u_box = region_uncertainty(pred, it[1], it[0], box, n=6, jitter_px=4, seed=i)
        u_auto = region_uncertainty(pred, it[1], it[0], None, n=6, jitter_px=4, seed=i)
        rows.append((d, u_box, u_auto))
    d, ub, ua = (np.array(c) for c in zip(*rows))
    res = {"images": len(rows), "mean_dice": float(d.mean()), "mean_u_box": float(ub.mean()),
           "mean_u_auto": float(ua.mean()), "spearman_box": float(spearmanr(ub, 1 - d).statistic),
           "spearman_auto": float(spearmanr(ua, 1 - d).statistic), "seconds": round(time.time() - t0, 1)}
    log(f"region check: {res}")
    return res


def summarise(runs: list[dict], a) -> dict:
    rows = {}
    for strat in ORDER:
        curves = [r[strat]["curve"] for r in runs]
        labels = [c["labels"] for c in curves[0]]
        rows[strat] = {"labels": labels}
        for key in ("f1", "accuracy", "dice"):
            v = np.array([[c[key] for c in cur] for cur in curves])
            rows[strat][key] = {"mean": v.mean(0).tolist(), "std": v.std(0).tolist()}
        rows[strat]["ambiguous_picked"] = int(sum(c.get("ambiguous_picked", 0) for cur in curves for c in cur))
    final = {key: rows["random"][key]["mean"][-1] for key in ("f1", "dice")}
    n_final = rows["random"]["labels"][-1]
    for strat in ORDER:
        for key in ("f1", "dice"):
            need = labels_to_reach(rows[strat]["labels"], rows[strat][key]["mean"], final[key])
            rows[strat][f"{key}_labels_to_random_final"] = need
            rows[strat][f"{key}_label_fraction"] = None if need is None else need / n_final
    return {"strategies": rows, "random_final": final, "random_final_labels": n_final}


def plot(summary: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, name in zip(axes, ("f1", "dice"), ("test macro-F1 (CSR, retrained)", "test Dice (lesion patch probe)")):
        for strat, row in summary["strategies"].items():
            m, s = np.array(row[key]["mean"]), np.array(row[key]["std"])
            line, = ax.plot(row["labels"], m, marker="o", ms=3, label=strat, lw=2.2 if strat == "random" else 1.5,
                            color="k" if strat == "random" else None)
            ax.fill_between(row["labels"], m - s, m + s, alpha=0.08, color=line.get_color(), lw=0)
        ax.axhline(summary["random_final"][key], ls="--", lw=0.8, color="grey", label="random's final")
        ax.set_xlabel("labelled images (mean ± std over seeds)")
        ax.set_title(name)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF CLIP dir (default: the embedded default CLIP)")
    ap.add_argument("--pool", type=int, default=300)
    ap.add_argument("--test", type=int, default=150)
    ap.add_argument("--init", type=int, default=12, help="random initial labelled set")
    ap.add_argument("--k", type=int, default=12, help="images labelled per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=60, help="CSR training steps per round")
    ap.add_argument("--region-check", type=int, default=100, help="pool images for the region-uncertainty check (0: skip)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="smoke run: pool 48, test 30, init/K 6, 2 rounds, 1 seed, 30 steps, 4 region images")
    ap.add_argument("--out", default=None, help="output stem (default results/active_learning[_quick])")
    a = ap.parse_args(argv)
    if a.quick:  # sizes not given on the command line shrink to a smoke run
        for key, v in QUICK.items():
            if getattr(a, key) == ap.get_default(key):
                setattr(a, key, v)
    out = Path(a.out) if a.out else RESULTS / ("active_learning_quick" if a.quick else "active_learning")
    torch.set_num_threads(a.threads)
    t0 = time.time()
    log = lambda s: print(f"[{time.time() - t0:6.0f}s] {s}", flush=True)  # noqa: E731
    bundle = load_clip(a.model or DEFAULT_CLIP_DIR, device="cpu")
    concepts, classes = CSR_FAMILIES[FAMILY]
    anchors = concept_text_embeddings(bundle, concepts)
    proto = CSRModel(bundle.model, concepts, classes, anchors)
    pool = load_set(bundle, proto, POOL_BASE, a.pool, oracle=True, log=log)
    test = load_set(bundle, proto, TEST_BASE, a.test, oracle=False, log=log)
    runs = [run_seed(bundle, anchors, pool, test, a, s, log) for s in range(a.seeds)]
    summary = summarise(runs, a)
    reg = region_check(bundle, pool, a.region_check, log) if a.region_check else None
    out.parent.mkdir(parents=True, exist_ok=True)
    plot(summary, out.with_suffix(".png"))
    seconds = round(time.time() - t0, 1)

    S, nf = summary["strategies"], summary["random_final_labels"]
    fmt = lambda row, key, i: f"{row[key]['mean'][i]:.3f} ± {row[key]['std'][i]:.3f}"  # noqa: E731
    need = lambda v: "not reached" if v is None else f"{v:.1f} ({100 * v / nf:.0f}%)"  # noqa: E731
    cands = {s: S[s]["f1_labels_to_random_final"] for s in ORDER if s != "random"}
    reached = {s: v for s, v in cands.items() if v is not None}
    best = min(reached, key=reached.get) if reached else None
    degenerate = S["random"]["f1"]["mean"][0] >= summary["random_final"]["f1"]
    met = best is not None and reached[best] <= 0.7 * nf and not degenerate
    lines = [header("Active learning with a simulated clinician (derm phantoms)"),
             f"- pool: {a.pool} derm phantoms (seeds {POOL_BASE}·1000003+500000+i), test: {a.test} held-out derm "
             f"phantoms (seed base {TEST_BASE}, as benchmarks/concepts.py); shipped models use seed base 0. 3 classes "
             f"{classes}, {len(concepts)} concepts.",
             f"- protocol: {a.init} random initial labels (the same set for every strategy within a seed), then "
             f"{a.rounds} rounds of K={a.k}; {a.seeds} seeds (initial set, CSR init and random picks). The oracle "
             "supplies class, concept labels and masks (concept masks as CSR drawn regions, lesion mask for the "
             "probe).",
             f"- retrained each round, from scratch, on the frozen default CLIP's cached features: the CSR model "
             f"(all four stages, `train_csr`'s loop, {a.steps} steps, batch {DEFAULTS['batch']}, lr {DEFAULTS['lr']}, "
             "then the task-head refit) -> **test macro-F1, the primary curve**; and a lesion patch probe (logistic "
             "regression on frozen patch tokens, 14x14 grid upsampled) -> **test Dice**. The region model is not "
             "retrained in the loop (far too slow on CPU); its uncertainty is checked separately below.",
             "- strategies: random; uncertainty = CSR predictive entropy; ambiguity = lowest CSR top-2 class margin "
             f"(< {AMBIGUOUS_MARGIN} = ambiguous); diversity = greedy k-center on L2-normalised CLIP image embeddings "
             "(labelled set as centres); hybrid = mean of rank-normalised entropy and −margin, then k-center among "
             "the top 3K.",
             f"- runtime: {seconds:.0f}s on {a.threads} thread(s).", "",
             "## Test macro-F1 (mean ± std over seeds)", "",
             "| labels | " + " | ".join(ORDER) + " |", "|---|" + "---|" * len(ORDER)]
    labels = S["random"]["labels"]
    for i, n_lab in enumerate(labels):
        lines.append(f"| {n_lab} | " + " | ".join(fmt(S[s], "f1", i) for s in ORDER) + " |")
    lines += ["", "## Test Dice of the lesion patch probe (mean ± std over seeds)", "",
              "| labels | " + " | ".join(ORDER) + " |", "|---|" + "---|" * len(ORDER)]
    for i, n_lab in enumerate(labels):
        lines.append(f"| {n_lab} | " + " | ".join(fmt(S[s], "dice", i) for s in ORDER) + " |")
    lines += ["", f"## Labels needed to reach random's final score (random: {nf} labels; linear interpolation on "
              "the mean curve)", "",
              f"| strategy | macro-F1 ≥ {summary['random_final']['f1']:.3f} | Dice ≥ {summary['random_final']['dice']:.3f} "
              "| ambiguous picks (margin < 0.3) |", "|---|---|---|---|"]
    for s in ORDER:
        lines.append(f"| {s} | {need(S[s]['f1_labels_to_random_final'])} | {need(S[s]['dice_labels_to_random_final'])} "
                     f"| {S[s]['ambiguous_picked']} / {a.rounds * a.k * a.seeds} |")
    verdict = (f"**met** by {best} ({reached[best]:.1f} labels = {100 * reached[best] / nf:.0f}% of random's {nf})"
               if met else ("**missed**" + (f" (best: {best}, {reached[best]:.1f} labels = "
                                            f"{100 * reached[best] / nf:.0f}% of {nf})" if best else
                                            " (no strategy reached random's final macro-F1)")))
    if degenerate:
        verdict = "**not assessable**: random's mean macro-F1 at the initial labels is already ≥ its final value " \
                  "(flat, noisy curve), so every strategy 'reaches' it at the start"
    lines += ["", f"Target (best strategy reaches random's final test macro-F1 with ≤ 70% of its labels): {verdict}.", ""]
    if reg:
        lines += ["## Region uncertainty of the shipped region model (not in the loop)", "",
                  f"On {reg['images']} pool images: mean Dice with the lesion box {reg['mean_dice']:.3f}; "
                  f"`region_uncertainty` (6 runs, 4 px jitter) mean {reg['mean_u_box']:.3f} with the lesion box, "
                  f"{reg['mean_u_auto']:.3f} prompt-free (`auto_prompt`); Spearman correlation with 1 − Dice: "
                  f"{reg['spearman_box']:.3f} (box), {reg['spearman_auto']:.3f} (prompt-free). "
                  f"({reg['seconds']:.0f}s)", ""]
    out.with_suffix(".md").write_text("\n".join(lines))
    out.with_suffix(".json").write_text(json.dumps({"args": vars(a), "summary": summary, "region_check": reg,
                                                    "runs": runs, "target_met": met, "best": best,
                                                    "seconds": seconds}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
