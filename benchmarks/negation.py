"""Negation retrieval benchmark: the default CLIP, its text tower fine-tuned with CON1 and CON2, and
the app's negation-aware scoring, on held-out chest and derm phantoms (methods.md §5).

Prompts per finding f of a family: positive ("f", "there is f", "f is present"), negated (the
clinical templates: "no f", "no evidence of f", "f is absent", "without f"), negated with phrasings
no training caption uses ("negative for f", "free of f", "f is not seen"), and mixed for every
ordered pair ("f1, but no f2" and NegBench's "this image features f1, but not f2").
Text->image retrieval within the prompt's family, in random galleries of held-out images: top-1
(top-5) accuracy = share of (prompt, gallery) pairs whose first image (any of the first five)
satisfies the prompt. Pairwise: over (image, finding) pairs, cos(image, true statement) >
cos(image, its opposite) with "f" vs "no f". CON1, CON2 and a multi-positive CON2 variant are
trained in this run by `train_negation` on the same images, seed and steps; the app's
negation-aware scoring and a linear probe on the frozen image embeddings (a ceiling for any
text-side tuning) are reference rows. Writes benchmarks/results/negation.md and .json.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, header  # noqa: E402
from zeroshot_findings import HELD_OUT, embed, held_out  # noqa: E402

from clinlens.data.phantoms import CHEST_FINDINGS, DERM_CONCEPTS  # noqa: E402
from clinlens.models.clip import DEFAULT_CLIP_DIR, load_clip  # noqa: E402
from clinlens.models.negation_tuning import MIXED_TEMPLATES  # noqa: E402
from clinlens.models.zeroshot import ZeroShotScorer  # noqa: E402
from clinlens.text.negation import NEGATION_TEMPLATES, affirm, negate  # noqa: E402
from clinlens.trainers.negation import (DEFAULTS, image_embeddings, phantom_presence, split_seeds,  # noqa: E402
                                        train_negation)

FAMILIES = {"chest": CHEST_FINDINGS, "derm": DERM_CONCEPTS}
POSITIVE = ("{}", "there is {}", "{} is present")
UNSEEN_NEGATION = ("negative for {}", "free of {}", "{} is not seen")   # in no training caption
KINDS = ("positive", "negated", "mixed", "unseen")
TARGET_NEG, TARGET_POS = 15.0, 2.0   # percentage points: negated top-1 gain, positive top-1 loss at most


def prompts(findings) -> list[dict]:
    """{text, kind, need: {finding: 0/1}, parts: scorer prompts whose probabilities multiply}."""
    out = [dict(text=t.format(affirm(f)), kind="positive", need={f: 1}, parts=[t.format(affirm(f))])
           for f in findings for t in POSITIVE]
    out += [dict(text=negate(f, t), kind="negated", need={f: 0}, parts=[negate(f, t)])
            for f in findings for t in NEGATION_TEMPLATES]
    out += [dict(text=t.format(f), kind="unseen", need={f: 0}, parts=[t.format(f)]) for f in findings
            for t in UNSEEN_NEGATION]
    for f1 in findings:
        for f2 in findings:
            if f1 != f2:
                for k, t in enumerate(MIXED_TEMPLATES):
                    text = t.format(affirm(f1), "not " + f2 if k else negate(f2))
                    out.append(dict(text=text, kind="mixed", need={f1: 1, f2: 0}, parts=[affirm(f1), negate(f2)]))
    return out


def satisfied(labels: list[dict], need: dict) -> np.ndarray:
    return np.array([all(lab.get(f, 0) == v for f, v in need.items()) for lab in labels])


def retrieval(scores: np.ndarray, ok: np.ndarray) -> dict:
    """scores (P, N) for P prompts over N images, ok (P, N) bool -> per-prompt top1, top5, AP."""
    from sklearn.metrics import average_precision_score

    order = np.argsort(-scores, axis=1, kind="stable")
    hit = np.take_along_axis(ok, order, 1)
    ap = [average_precision_score(o, s) for o, s in zip(ok, scores)]
    return {"top1": hit[:, 0].astype(float), "top5": hit[:, :5].any(1).astype(float), "ap": np.array(ap),
            "chance": ok.mean(1)}


def fit_probes(emb_train: np.ndarray, presence: list[dict]) -> dict:
    """Reference ranker, not a text model: per family and finding a logistic regression on the frozen
    image embeddings of the training phantoms; its weight vector is the best linear direction the
    fixed image encoder offers for that finding."""
    from sklearn.linear_model import LogisticRegression

    keys = [tuple(sorted(p)) for p in presence]
    probes = {}
    for fam, findings in FAMILIES.items():
        sel = [i for i, k in enumerate(keys) if k == tuple(sorted(findings))]
        probes[fam] = {f: LogisticRegression(C=1.0, max_iter=3000).fit(
            emb_train[sel], np.array([presence[i][f] for i in sel])) for f in findings}
    return probes


def _log_sigmoid(z):
    return -np.logaddexp(0, -z)


def make_galleries(ps, n: int, size: dict, seed: int = 0) -> dict:
    """family -> `n` random galleries (positions among the family's images) of `size[family]` images each."""
    rng = np.random.default_rng(seed)
    fams = np.array(ps.family)
    out = {}
    for fam in FAMILIES:
        total = int((fams == fam).sum())
        if total < size[fam]:
            raise ValueError(f"{total} held-out {fam} images, galleries need {size[fam]}")
        out[fam] = [np.sort(rng.choice(total, size[fam], replace=False)) for _ in range(n)]
    return out


def evaluate(bundle, emb: torch.Tensor, ps, galleries: dict, mode: str = "cosine", probes=None) -> dict:
    """Per family and kind: per-(prompt, gallery) metrics; plus the pairwise rate over all the family's
    images. Each gallery (`make_galleries`) is ranked separately. `mode`: "cosine"
    (text->image cosine), "scorer" (the app's negation-aware ZeroShotScorer probabilities; mixed =
    p(f1) * (1 - p(f2))) or "probe" (`fit_probes` log-probabilities; reference only)."""
    fams = np.array(ps.family)
    res = {}
    for fam, findings in FAMILIES.items():
        every = np.flatnonzero(fams == fam)
        plist = prompts(findings)
        e = emb[torch.from_numpy(every)].float().cpu()
        with torch.no_grad():
            if mode == "scorer":   # probabilities of every scorer part on every image of the family
                parts = list(dict.fromkeys(q for p in plist for q in p["parts"]))
                images = ps.array()[every]
                sc = ZeroShotScorer(bundle, parts + [affirm(f) for f in findings if affirm(f) not in parts])
                prob = torch.cat([sc(bundle.pixel_values(images[i:i + 64].astype(np.float32) / 255)).float().cpu()
                                  for i in range(0, len(images), 64)]).numpy()     # (N, parts)
                col = {q: j for j, q in enumerate(sc.prompts)}
                allscores = np.stack([np.prod([prob[:, col[q]] for q in p["parts"]], 0) for p in plist])
                margin = prob[:, [col[affirm(f)] for f in findings]] - 0.5
            elif mode == "probe":
                z = {f: probes[fam][f].decision_function(e.numpy()) for f in findings}
                allscores = np.stack([sum(_log_sigmoid(z[f] if v else -z[f]) for f, v in p["need"].items())
                                      for p in plist])
                margin = np.stack([z[f] for f in findings], 1)
            else:
                t = bundle.encode_texts([p["text"] for p in plist], cache=False).float().cpu()
                allscores = (t @ e.T).numpy()
                tf = bundle.encode_texts([affirm(f) for f in findings], cache=False).float().cpu()
                tn = bundle.encode_texts([negate(f) for f in findings], cache=False).float().cpu()
                margin = ((e @ tf.T) - (e @ tn.T)).numpy()          # > 0: "f" preferred
        labels_all = [ps.labels[i] for i in every]
        present = np.array([[lab[f] for f in findings] for lab in labels_all], bool)
        pair = (margin > 0) == present
        acc = {k: {m: [] for m in ("top1", "top5", "ap", "chance")} for k in KINDS}
        for sl in galleries[fam]:
            labels = [labels_all[j] for j in sl]
            keep = [j for j, p in enumerate(plist) if satisfied(labels, p["need"]).any()]
            ok = np.stack([satisfied(labels, plist[j]["need"]) for j in keep])
            r = retrieval(allscores[keep][:, sl], ok)
            kinds = np.array([plist[j]["kind"] for j in keep])
            for k in KINDS:
                for m in acc[k]:
                    acc[k][m].append(r[m][kinds == k])
        res[fam] = {k: {m: np.concatenate(v) for m, v in acc[k].items()} for k in KINDS}
        res[fam]["pairwise"] = pair.astype(float).ravel()
        res[fam]["pairwise_balanced"] = 0.5 * (pair[present].mean() + pair[~present].mean())
        res[fam]["n_images"] = len(every)
    return res


def summarise(res: dict) -> dict:
    """Pooled over families: share of (prompt, gallery) pairs (in %) and pairwise rates (in %)."""
    out = {}
    for k in KINDS:
        for m in ("top1", "top5", "ap", "chance"):
            v = np.concatenate([res[f][k][m] for f in FAMILIES])
            out[f"{k}_{m}"] = 100 * float(v.mean())
        out[f"{k}_n"] = int(sum(len(res[f][k]["top1"]) for f in FAMILIES))
    out["pairwise"] = 100 * float(np.concatenate([res[f]["pairwise"] for f in FAMILIES]).mean())
    out["pairwise_balanced"] = 100 * float(np.mean([res[f]["pairwise_balanced"] for f in FAMILIES]))
    out["per_family"] = {f: {**{f"{k}_{m}": 100 * float(res[f][k][m].mean()) for k in KINDS
                                for m in ("top1", "top5", "ap")},
                             "pairwise": 100 * float(res[f]["pairwise"].mean()),
                             "pairwise_balanced": 100 * float(res[f]["pairwise_balanced"])} for f in FAMILIES}
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(DEFAULT_CLIP_DIR), help="base HF CLIP dir (default: the embedded default)")
    ap.add_argument("--steps", type=int, default=DEFAULTS["steps"])
    ap.add_argument("--n-images", type=int, default=DEFAULTS["n_images"], help="training phantoms (chest + derm)")
    ap.add_argument("--lr", type=float, default=DEFAULTS["lr"])
    ap.add_argument("--batch", type=int, default=DEFAULTS["batch"])
    ap.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    ap.add_argument("--n-chest", type=int, default=600, help="held-out chest phantoms (the gallery pool)")
    ap.add_argument("--n-derm", type=int, default=450, help="held-out derm phantoms (the gallery pool)")
    ap.add_argument("--galleries", type=int, default=30, help="random galleries per family")
    ap.add_argument("--gallery-size", type=int, default=150, help="images per gallery")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out-models", default=None, help="keep the tuned models here (con1/, con2/, ...)")
    ap.add_argument("--quick", action="store_true", help="smoke run: few images, steps and galleries")
    ap.add_argument("--out", default=None, help="results path stem (default benchmarks/results/negation)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.quick:
        a.steps, a.n_images, a.n_chest, a.n_derm = min(a.steps, 30), min(a.n_images, 120), 80, 80
        a.galleries, a.gallery_size = 5, 60
    out = Path(a.out) if a.out else RESULTS / ("negation_quick" if a.quick else "negation")
    t0 = time.time()

    base = load_clip(a.model)
    size = base.image_size
    if any(r.stop > HELD_OUT for r in split_seeds(tuple(FAMILIES), a.n_images, a.seed).values()):
        raise SystemExit("training seeds would overlap the held-out seeds")
    ps = held_out({"chest": a.n_chest, "derm": a.n_derm}, size, seed=2)
    galleries = make_galleries(ps, a.galleries, {f: a.gallery_size for f in FAMILIES}, seed=a.seed)
    data = phantom_presence(tuple(FAMILIES), a.n_images, a.seed, size)
    tmp = tempfile.TemporaryDirectory(prefix="negation_models_")
    root = Path(a.out_models) if a.out_models else Path(tmp.name)
    common = dict(steps=a.steps, batch=a.batch, lr=a.lr, n_images=a.n_images, seed=a.seed, data=data)
    variants = {"CON1": ("con1", {}), "CON2": ("con2", {}),
                "CON2, multi-positive targets (variant)": ("con2", {"multi_positive": True})}
    train, dirs = {}, {}
    for name, (loss, extra) in variants.items():
        dirs[name] = root / (loss if not extra else f"{loss}_multipositive")
        train[name] = train_negation(a.model, dirs[name], loss=loss, **common, **extra)
    emb0 = embed(base, ps.array())
    probes = fit_probes(image_embeddings(base, data[0]).cpu().numpy(), data[1])
    rows = {"default": summarise(evaluate(base, emb0, ps, galleries))}
    for name, path in dirs.items():
        bundle = load_clip(path)
        rows[name] = summarise(evaluate(bundle, embed(bundle, ps.array()), ps, galleries))
    rows["default + negation-aware scoring"] = summarise(evaluate(base, emb0, ps, galleries, mode="scorer"))
    rows["reference: linear probe on the frozen image embeddings"] = summarise(
        evaluate(base, emb0, ps, galleries, mode="probe", probes=probes))
    for name, r in rows.items():
        print(name, {k: round(v, 1) for k, v in r.items() if isinstance(v, float)}, flush=True)
    tmp.cleanup()

    d, c2 = rows["default"], rows["CON2"]
    t2 = train["CON2"]
    lines = [header("Negation retrieval: default CLIP vs its text tower fine-tuned with CON1 / CON2 (CoN-CLIP)"),
             "## Setup", "",
             f"- Base model `{a.model}` (the image encoder is the same in every row: frozen in fine-tuning).",
             f"- Held-out phantoms (seeds from {HELD_OUT:,}): a pool of {a.n_chest} chest and {a.n_derm} derm images at "
             f"{size}x{size}. Each prompt ranks the images of its own family in {a.galleries} random galleries of "
             f"{a.gallery_size} images per family (the same galleries for every row); top-k figures are shares of "
             "(prompt, gallery) pairs, so a gallery's luck counts less than with one fixed gallery.",
             f"- Prompts per family and gallery: positive (\"f\", \"there is f\", \"f is present\"); negated with the clinical "
             "templates (\"no f\", \"no evidence of f\", \"f is absent\", \"without f\"); negated with phrasings no training "
             "caption uses (\"negative for f\", \"free of f\", \"f is not seen\"); mixed for every ordered pair "
             "(\"f1, but no f2\" and NegBench's \"this image features f1, but not f2\"). Pooled counts (prompt x gallery): "
             f"positive {d['positive_n']}, negated {d['negated_n']}, unseen {d['unseen_n']}, mixed {d['mixed_n']}.",
             "- Top-1 / top-5: share (%) whose first image (any of the first five) satisfies the prompt (f present; f "
             "absent; f1 present and f2 absent). mAP: mean average precision of the ranking. Pairwise: share (%) of "
             "(image, finding) pairs with cos(image, true statement) > cos(image, its opposite), \"f\" vs \"no f\", over "
             "all held-out images; balanced = mean of the rates on present and on absent pairs (findings are absent in "
             "most chest images, so the plain rate rewards always preferring \"no f\"). Chance: expected top-1 of a "
             "random ranking.",
             f"- CON1 / CON2: `train_negation` (clinlens/trainers/negation.py) from the base, in this run: {a.n_images} "
             "training phantoms (chest + derm, seeds from 20,000,000, disjoint from the held-out ones), image encoder "
             f"frozen, text transformer + text projection trained, {a.steps} steps, batch {a.batch}, lr {a.lr:g}, "
             f"loss temperature {t2['loss_scale'] or 'the model logit scale'}, seed {a.seed}; the same images, batches of "
             "anchors/distractors and seed for every variant. CON2 = the CoN-CLIP loss of methods.md §5 (images vs "
             "[captions; negated], captions vs images, distractors vs swapped texts; targets arange(B)). CON1 = "
             "symmetric CLIP InfoNCE on the same anchors and distractors, each with one true report-like caption "
             "(affirmed, negated or mixed), never paired with its own negation. The variant row replaces the "
             "arange(B) targets by every in-batch text that is true of the image (\"no mass\" is also true of most "
             "other images), which the paper's loss counts as negatives.",
             "- default + negation-aware scoring: no fine-tuning; prompts ranked by the app's `ZeroShotScorer` "
             "probability (a negated prompt scores 1 - p(affirmed); a mixed prompt p(f1) * (1 - p(f2)) from its two "
             "parts, since the app rejects mixed prompts).",
             "- Reference (not a text model): per finding a logistic regression on the frozen image embeddings of the "
             "training phantoms, ranking by its log-probabilities; roughly the best a linear ranker on this image "
             "encoder can do, i.e. a ceiling for any text-tower fine-tuning.", "",
             "## Results", "",
             "| model | positive top-1 | positive top-5 | negated top-1 | negated top-5 | mixed top-1 | mixed top-5 "
             "| negated, unseen phrasing top-1 | pairwise | pairwise balanced |", "|---|---|---|---|---|---|---|---|---|---|"]
    cols = ("positive_top1", "positive_top5", "negated_top1", "negated_top5", "mixed_top1", "mixed_top5",
            "unseen_top1", "pairwise", "pairwise_balanced")
    for name, r in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{r[c]:.1f}" for c in cols) + " |")
    lines.append("| chance (random ranking) | " + " | ".join(
        f"{d[c.replace('top1', 'chance')]:.1f}" if c.endswith("top1") else "" for c in cols[:-2]) + " | 50.0 | 50.0 |")
    lines += ["", "Deltas vs default (percentage points):", "",
              "| model | positive top-1 | negated top-1 | mixed top-1 | unseen top-1 | pairwise | pairwise balanced "
              "| positive mAP | negated mAP | mixed mAP |", "|---|---|---|---|---|---|---|---|---|---|"]
    dcols = ("positive_top1", "negated_top1", "mixed_top1", "unseen_top1", "pairwise", "pairwise_balanced",
             "positive_ap", "negated_ap", "mixed_ap")
    for name, r in list(rows.items())[1:]:
        lines.append(f"| {name} | " + " | ".join(f"{r[c] - d[c]:+.1f}" for c in dcols) + " |")
    lines += ["", "mAP (%) and per-family top-1 (%):", "",
              "| model | family | positive mAP | negated mAP | mixed mAP | positive top-1 | negated top-1 | mixed top-1 "
              "| pairwise balanced |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | both | {r['positive_ap']:.1f} | {r['negated_ap']:.1f} | {r['mixed_ap']:.1f} | "
                     f"{r['positive_top1']:.1f} | {r['negated_top1']:.1f} | {r['mixed_top1']:.1f} | {r['pairwise_balanced']:.1f} |")
        for fam, pf in r["per_family"].items():
            lines.append(f"| | {fam} | {pf['positive_ap']:.1f} | {pf['negated_ap']:.1f} | {pf['mixed_ap']:.1f} | "
                         f"{pf['positive_top1']:.1f} | {pf['negated_top1']:.1f} | {pf['mixed_top1']:.1f} | "
                         f"{pf['pairwise_balanced']:.1f} |")
    gain, loss_pos = c2["negated_top1"] - d["negated_top1"], d["positive_top1"] - c2["positive_top1"]
    met = gain >= TARGET_NEG and loss_pos <= TARGET_POS
    ref = rows["reference: linear probe on the frozen image embeddings"]
    lines += ["", "## Target", "",
              f"Issue target: CON2 negated-prompt top-1 retrieval +{TARGET_NEG:.0f} points over default with at most "
              f"{TARGET_POS:.0f} points lost on positive prompts: **{'met' if met else 'missed'}** "
              f"(negated top-1 {d['negated_top1']:.1f} -> {c2['negated_top1']:.1f}, {gain:+.1f}; positive top-1 "
              f"{d['positive_top1']:.1f} -> {c2['positive_top1']:.1f}, {-loss_pos:+.1f}). The linear-probe reference on "
              f"the same frozen image embeddings reaches negated top-1 {ref['negated_top1']:.1f} "
              f"({ref['negated_top1'] - d['negated_top1']:+.1f}), and the app's negation-aware scoring "
              f"{rows['default + negation-aware scoring']['negated_top1']:.1f}.",
              "", "Training (first 20 -> last 20 steps' loss, seconds incl. embedding the training images): " + "; ".join(
                  f"{n} {t['first_loss']:.3f} -> {t['final_loss']:.3f}, {t['seconds']}s" for n, t in train.items())
              + f"; {t2['torch_threads']} torch thread(s) on {t2['device']}. Whole run {time.time() - t0:.0f}s.", ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(lines))
    out.with_suffix(".json").write_text(json.dumps({"rows": rows, "training": train, "target_met": met,
                                                    "negated_gain": gain, "positive_loss": loss_pos,
                                                    "args": vars(a)}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
