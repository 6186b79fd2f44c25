"""CSR clinician box interaction (methods.md §2): on held-out phantoms, the cases the shipped CSR model finds
ambiguous (top-2 class-probability margin < `--margin`) are re-predicted after a simulated clinician draws
boxes; macro-F1 / accuracy on those cases without and with boxes, and the cases that flip.

- Models: the shipped `csr_<family>.safetensors` (derm, chest) beside the default CLIP, trained by
  `clinlens train-default --concepts-only` on phantoms of seed base 0; held-out phantoms use seed base 9
  (`phantom_concept_items(family, 9, n)`, as benchmarks/concepts.py), generated at `--size` px; a model
  with a larger input (the chest model) resizes them, and the boxes are scaled onto its input.
- Boxes (pixels of the model input, `CSRModel.forward(pos_boxes=..., neg_boxes=...)`, importance map
  A = 1 inside positive boxes, 0 inside negative ones, alpha elsewhere; alpha = the model's, 0.2):
  *positive*: derm: the lesion mask's box; chest: one box per present finding's mask, and for a normal
  radiograph (nothing to point at) the box of both lungs, the region a reader checks.
  *negative* (chest only; the derm phantoms carry no distractor): the shortcut tag's box on the images that
  have one (a fair coin in the default chest phantoms, the shipped model's training data included).
- Scores: macro-F1 (over the classes present among the ambiguous cases' labels and predictions) and
  accuracy on the ambiguous cases; right→wrong and wrong→right flips; a paired bootstrap 95% interval of
  the macro-F1 change (`--boot` resamples of the ambiguous cases). All cases too, for context.

Writes benchmarks/results/concepts_boxes.md and .json.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, header, write_results  # noqa: E402
from concepts import macro_f1  # noqa: E402

from clinlens.data.image_io import to_unit_rgb  # noqa: E402
from clinlens.data.phantoms import make_chest, make_derm, mask_box  # noqa: E402
from clinlens.models.clip import load_clip  # noqa: E402
from clinlens.models.csr import CSRModel  # noqa: E402
from clinlens.trainers.concepts import _tensors, csr_file  # noqa: E402

HELD_OUT = 9  # seed base of the held-out phantoms (the shipped models: 0), as in benchmarks/concepts.py
MAKERS = {"derm": make_derm, "chest": make_chest}


PAPER = " · paper's rule"  # arm suffix: the head on the boxed scores as they are (`box_recentre=False`)


def held_out(fam: str, n: int, size: int, base: int = HELD_OUT) -> list:
    """The samples behind `phantom_concept_items(fam, base, n, size)` (same seeds, same images)."""
    return [MAKERS[fam](base * 1_000_003 + 500_000 + i, size=size) for i in range(n)]


def positive_boxes(fam: str, s) -> list:
    if fam == "derm":
        return [s.boxes["lesion"]]
    boxes = [s.boxes[f] for f, on in s.concepts.items() if on and s.boxes.get(f)]
    return boxes or [mask_box(s.anatomy["lungs"])]


def negative_boxes(fam: str, s) -> list:
    return [s.meta["shortcut_box"]] if fam == "chest" and s.meta.get("shortcut") else []


def predict(model: CSRModel, feats, pos=None, neg=None, alpha=None, chunk: int = 64) -> torch.Tensor:
    """Class probabilities (N, C) with optional per-image box lists."""
    out = []
    with torch.no_grad():
        for i in range(0, len(feats), chunk):
            sl = slice(i, i + chunk)
            p = [[list(map(float, b)) for b in bs] for bs in pos[sl]] if pos is not None else None
            n = [[list(map(float, b)) for b in bs] for bs in neg[sl]] if neg is not None else None
            if p is not None and not any(p):
                p = None
            if n is not None and not any(n):
                n = None
            out.append(model(features=feats[sl], pos_boxes=p, neg_boxes=n, alpha=alpha)["logits"].softmax(-1))
    return torch.cat(out)


def boot_delta(y, p0, p1, n_boot: int, seed: int = 0) -> tuple[float, float]:
    """Paired bootstrap 95% interval of macro-F1(p1) − macro-F1(p0)."""
    g = np.random.default_rng(seed)
    d = []
    for _ in range(n_boot):
        i = g.integers(0, len(y), len(y))
        d.append(macro_f1(y[i], p1[i]) - macro_f1(y[i], p0[i]))
    return float(np.percentile(d, 2.5)), float(np.percentile(d, 97.5))


def run_family(bundle, fam: str, a) -> dict:
    model = CSRModel.load(bundle, csr_file(bundle.path, fam))
    samples = held_out(fam, a.n_test, a.size, a.seed_base)
    items = [(f"{fam}_phantom_{s.meta['seed']}", to_unit_rgb(s.image), dict(s.concepts), s.diagnosis, {})
             for s in samples]
    feats, _, y, _ = _tensors(bundle, model, items)
    y = y.numpy()
    f = model.image_size / a.size  # boxes go to the model on its input
    on_input = lambda boxes: [[v * f for v in b] for b in boxes]  # noqa: E731
    pos = [on_input(positive_boxes(fam, s)) for s in samples]
    neg = [on_input(negative_boxes(fam, s)) for s in samples]
    prob0 = predict(model, feats)
    top2 = prob0.topk(2, -1).values
    amb = ((top2[:, 0] - top2[:, 1]) < a.margin).numpy()
    arms = {"positive": dict(pos=pos)}
    if any(neg):
        arms["negative"] = dict(neg=neg)
        arms["positive + negative"] = dict(pos=pos, neg=neg)
    arms.update({k + PAPER: v for k, v in list(arms.items())})
    pred0 = prob0.argmax(-1).numpy()
    row = {"classes": model.classes, "n": len(samples), "ambiguous": int(amb.sum()), "margin": a.margin,
           "alpha": model.config["alpha"], "images_with_negative_box": int(sum(bool(b) for b in neg)),
           "none": {"amb_f1": macro_f1(y[amb], pred0[amb]), "amb_acc": float((y[amb] == pred0[amb]).mean()),
                    "all_f1": macro_f1(y, pred0), "all_acc": float((y == pred0).mean())}, "arms": {}}
    recall = lambda pr: {c: float((pr[amb & (y == k)] == k).mean()) if (amb & (y == k)).any() else None  # noqa: E731
                         for k, c in enumerate(model.classes)}
    row["none"]["amb_recall"] = recall(pred0)
    for arm, kw in arms.items():
        model.config["box_recentre"] = not arm.endswith(PAPER)
        pred = predict(model, feats, **kw).argmax(-1).numpy()
        r = {"amb_f1": macro_f1(y[amb], pred[amb]), "amb_acc": float((y[amb] == pred[amb]).mean()),
             "all_f1": macro_f1(y, pred), "all_acc": float((y == pred).mean()),
             "right_to_wrong": int(((pred0 == y) & (pred != y) & amb).sum()),
             "wrong_to_right": int(((pred0 != y) & (pred == y) & amb).sum()),
             "changed": int(((pred != pred0) & amb).sum()),
             "all_right_to_wrong": int(((pred0 == y) & (pred != y)).sum()),
             "all_wrong_to_right": int(((pred0 != y) & (pred == y)).sum())}
        r["amb_recall"] = recall(pred)
        r["amb_f1_delta"] = r["amb_f1"] - row["none"]["amb_f1"]
        r["amb_f1_delta_ci95"] = boot_delta(y[amb], pred0[amb], pred[amb], a.boot) if amb.sum() > 1 else None
        sweep = {}
        for al in a.alpha_sweep:
            pa = predict(model, feats, alpha=al, **kw).argmax(-1).numpy()
            sweep[str(al)] = macro_f1(y[amb], pa[amb])
        r["amb_f1_by_alpha"] = sweep
        row["arms"][arm] = r
    model.config["box_recentre"] = True
    per_class = {c: int(((y == k) & amb).sum()) for k, c in enumerate(model.classes)}
    row["ambiguous_per_class"] = per_class
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF CLIP dir with csr_<family>.safetensors (default: embedded)")
    ap.add_argument("--families", default="derm,chest")
    ap.add_argument("--n-test", type=int, default=600, help="held-out phantoms per family")
    ap.add_argument("--margin", type=float, default=0.3, help="ambiguous: top-2 probability margin below this")
    ap.add_argument("--alpha-sweep", type=float, nargs="*", default=[0.0, 0.5, 0.8])
    ap.add_argument("--boot", type=int, default=2000)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--seed-base", type=int, default=HELD_OUT,
                    help="phantom seed base (9 = the held-out set; the recentring was chosen on 5 and 6)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="smoke run: 60 phantoms per family, 100 bootstrap draws")
    ap.add_argument("--out", default=str(RESULTS / "concepts_boxes"))
    a = ap.parse_args(argv)
    if a.quick:
        a.n_test, a.boot = 60, 100
    torch.set_num_threads(a.threads)
    t0 = time.time()
    bundle = load_clip(a.model, device="cpu")
    fams = [f for f in a.families.split(",") if f]
    rows = {fam: run_family(bundle, fam, a) for fam in fams}
    lines = [header("CSR box interaction on ambiguous held-out cases"),
             f"- models: `{bundle.path}` shipped `csr_<family>.safetensors` (trained on phantoms of seed base 0, "
             "their concept masks as drawn regions); "
             f"held-out: {a.n_test} phantoms per family (seed base {a.seed_base}), {a.size} px, resized to the model "
             "input and the boxes scaled onto it (the input per family: `SHIPPED` in clinlens/trainers/concepts.py).",
             f"- ambiguous: top-2 class-probability margin < {a.margin} without boxes. Boxes re-weight every "
             "prototype similarity map by A (1 in positive boxes, 0 in negative boxes, alpha elsewhere; alpha = the "
             "model's, given per family) before the max, then the task head re-predicts: on the boxed scores "
             "recentred by their mean drop where a positive box is given (the app's rule, `CSRModel.box_shift`; "
             "negative boxes alone leave A = 1 outside them and are not recentred), and, in the rows marked "
             f"'{PAPER.strip(' ·')}', on the boxed scores as they are (`box_recentre=False`). The recentring, and "
             "leaving negative-only boxes out of it, were chosen on phantoms of seed bases 5 and 6 (`--seed-base`), "
             "not on this set.",
             "- simulated clinician: *positive* = derm: the lesion's box; chest: one box per present finding's mask "
             "(the lungs' box on a normal radiograph). *negative* (chest only) = the shortcut tag's box where there is "
             "one; *positive + negative* = both. Derm phantoms have no distractor, so derm has no negative arm.",
             "- macro-F1 over the classes present among the ambiguous cases; ΔF1 with a paired bootstrap 95% "
             f"interval ({a.boot} resamples); flips counted on the ambiguous cases.",
             f"- total {time.time() - t0:.0f} s.", "",
             "| family | alpha | ambiguous / held-out | boxes | macro-F1 no boxes | macro-F1 boxes | ΔF1 [95% CI] | "
             "acc no boxes | acc boxes | right→wrong | wrong→right |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for fam, r in rows.items():
        for arm, x in r["arms"].items():
            ci = x["amb_f1_delta_ci95"]
            ci = f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else ""
            lines.append(f"| {fam} | {r['alpha']} | {r['ambiguous']} / {r['n']} | {arm} | {r['none']['amb_f1']:.3f} | "
                         f"{x['amb_f1']:.3f} | {x['amb_f1_delta']:+.3f}{ci} | {r['none']['amb_acc']:.3f} | "
                         f"{x['amb_acc']:.3f} | {x['right_to_wrong']} | {x['wrong_to_right']} |")
    lines += ["", "All held-out cases (context; flips over all cases):", "",
              "| family | boxes | macro-F1 no boxes → boxes | acc no boxes → boxes | right→wrong | wrong→right |",
              "|---|---|---|---|---|---|"]
    for fam, r in rows.items():
        for arm, x in r["arms"].items():
            lines.append(f"| {fam} | {arm} | {r['none']['all_f1']:.3f} → {x['all_f1']:.3f} | "
                         f"{r['none']['all_acc']:.3f} → {x['all_acc']:.3f} | {x['all_right_to_wrong']} | "
                         f"{x['all_wrong_to_right']} |")
    lines += ["", "Alpha sensitivity (macro-F1 on the ambiguous cases; no boxes at left):", "",
              "| family | boxes | no boxes | " + " | ".join(f"alpha {al}" for al in a.alpha_sweep) + " |",
              "|---|---|---|" + "---|" * len(a.alpha_sweep)]
    for fam, r in rows.items():
        for arm, x in r["arms"].items():
            lines.append(f"| {fam} | {arm} | {r['none']['amb_f1']:.3f} | "
                         + " | ".join(f"{v:.3f}" for v in x["amb_f1_by_alpha"].values()) + " |")
    lines += ["", "Per-class recall on the ambiguous cases (count of ambiguous cases per true class in brackets):", ""]
    for fam, r in rows.items():
        cls = r["classes"]
        fmt = lambda v: "–" if v is None else f"{v:.2f}"  # noqa: E731
        lines += [f"| {fam} | " + " | ".join(f"{c} ({r['ambiguous_per_class'][c]})" for c in cls) + " |",
                  "|---|" + "---|" * len(cls),
                  "| no boxes | " + " | ".join(fmt(r["none"]["amb_recall"][c]) for c in cls) + " |"]
        lines += [f"| {arm} | " + " | ".join(fmt(x["amb_recall"][c]) for c in cls) + " |" for arm, x in r["arms"].items()]
        lines.append("")
    verdict = {}
    for fam, r in rows.items():
        for arm, x in r["arms"].items():
            if not arm.endswith(PAPER):
                verdict[f"{fam} / {arm}"] = x["amb_f1_delta"] >= 0
    ok = all(verdict.values())
    lines.append("Target: box interaction never lowers macro-F1 on the ambiguous cases — "
                 f"**{'met' if ok else 'missed'}** (" + ", ".join(
                     f"{k}: {rows[k.split(' / ')[0]]['arms'][k.split(' / ')[1]]['amb_f1_delta']:+.3f}"
                     for k in verdict) + ").")
    sig = [f"{fam} / {arm}" for fam, r in rows.items() for arm, x in r["arms"].items()
           if not arm.endswith(PAPER) and x["amb_f1_delta_ci95"] and x["amb_f1_delta_ci95"][1] < 0]
    lines.append("Arms whose 95% interval lies below zero (a significant loss): " + (", ".join(sig) or "none") + ".")
    lines.append("")
    write_results(a.out, lines, {"args": vars(a), "families": rows, "target_met": ok, "verdict": verdict})


if __name__ == "__main__":
    main()
