"""How many vision blocks to explain over, and with which channel weights (the `blocks` and `gradient`
options of `clinlens.explain.grad_eclip.explain`), chosen on validation phantoms, never the held-out set:
for k = 1 .. the tower's depth, MedGrad and Grad-ECLIP summed over the last k blocks, with the exact
gradient and the direct one, against Grad-CAM and a random map, on the objects of
benchmarks/explain.py drawn from other seed bases (default 5 and 6). Deletion / insertion as
`explain.py --baseline mean --score probability` (patches replaced by the image's mean colour; score =
the target's probability among its rivals), pointing game, all-zero maps; paired gains over Grad-CAM with
95% bootstrap CIs; each method's cost beside a plain forward at k = 1 and all blocks. The choice: among
the timed rows within 1.5x a forward, those whose deletion and insertion gains over Grad-CAM are significant
on every base and whose pointing beats Grad-CAM's on every base; of these, per method, the lowest mean
deletion AUC.
Writes benchmarks/results/explain_blocks.md and .json.
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
from explain import boot_ci, heatmap, map_metrics, objects, rivals, scores, time_costs  # noqa: E402

from clinlens.explain.grad_eclip import resolve_target  # noqa: E402
from clinlens.models.clip import load_clip  # noqa: E402

BASELINES = ("gradcam", "random")


def row_names(depth: int, gradients) -> list[str]:
    """"gradcam", "random", then "medgrad@k" / "grad_eclip@k" per gradient (":direct" suffixed)."""
    return list(BASELINES) + [f"{m}@{k}" + ("" if g == "exact" else f":{g}") for g in gradients
                              for m in ("medgrad", "grad_eclip") for k in range(1, depth + 1)]


def run_base(bundle, base: int, n_images: int, depth: int, fracs, gradients=("exact",)) -> dict:
    """Per method row name (see `row_names`): per-object metrics."""
    names = row_names(depth, gradients)
    res = {m: {"deletion_auc": [], "insertion_auc": [], "pointing": [], "zero_map": []} for m in names}
    targets = {}
    for fam in ("chest", "derm"):
        for j, (oid, img, text, mask, _) in enumerate(objects(fam, n_images, 224, base)):
            for t in [text] + rivals(text):
                targets.setdefault(t, resolve_target(bundle, t))
            emb = torch.stack([targets[t].embedding for t in [text] + rivals(text)])
            mean = np.broadcast_to(img.mean((0, 1)), img.shape).astype(img.dtype)
            ends = scores(bundle, [img, mean], emb)
            pv = bundle.pixel_values(img)
            for i, name in enumerate(names):
                rng = np.random.default_rng([base, j, i, fam == "derm"])
                h = heatmap(bundle, name, pv, img, targets[text], rng, (14, 14))[0]
                m = map_metrics(bundle, h, img, mean, emb, fracs, ends, mask, rng)
                for k, v in res[name].items():
                    v.append(m[k])
        print(f"seed base {base}: {fam} done", flush=True)
    return res


def cost_section(bundle, base: int, depth: int, gradients, n: int, repeats: int, threads: int, data: dict) -> list:
    """Time per heatmap against a plain forward, side by side (explain.py's `time_costs`), for k = 1 and all
    blocks of each gradient, on the first validation objects of `base`."""
    items = []
    for fam in ("chest", "derm"):
        for _, img, text, _, _ in objects(fam, n, 224, base):
            if sum(f == fam for _, _, f in items) < -(-n // 2):
                items.append((img, resolve_target(bundle, text).embedding, fam))
    rows = [f"{m}@{k}" + ("" if g == "exact" else f":{g}") for g in gradients for m in ("medgrad", "grad_eclip")
            for k in sorted({1, depth})]
    cost = time_costs(bundle, items, repeats, 0, rows)
    data["cost"] = cost
    lines = [f"## Cost (seed base {base}, {len(items)} objects x {repeats} interleaved repeats, threads {threads})", "",
             "| map | ms per heatmap | ratio to a plain forward (no_grad) |", "|---|---|---|"]
    lines += [f"| {'plain forward' if k == 'forward' else k} | {c['median_ms']:.1f} | {c['ratio_to_forward']:.2f}x |"
              for k, c in cost.items()]
    return lines + ["", "- MedGrad computes the image's entropy every time (on a worker thread beside the forward, "
                    "the app's default).", ""]


def choice_section(data: dict, max_ratio: float = 1.5) -> list:
    """The rule of the module docstring, applied to the timed rows."""
    bases = list(data["bases"].values())
    lines = ["## Choice", "", f"Timed rows within {max_ratio}x a forward whose deletion and insertion gains over "
             "Grad-CAM are significant (95% CI above 0) on every base and whose pointing beats Grad-CAM's on every "
             "base:", "", "| map | cost | deletion gain significant | insertion gain significant | pointing above "
             "Grad-CAM | mean deletion AUC | eligible |", "|---|---|---|---|---|---|---|"]
    eligible = {}
    for row, c in data["cost"].items():
        if row == "forward":
            continue
        per = [b["summary"][row] for b in bases]
        dele = all(p["deletion_gain_ci95"][0] > 0 for p in per)
        ins = all(p["insertion_gain_ci95"][0] > 0 for p in per)
        point = all(p["pointing"] > b["summary"]["gradcam"]["pointing"] for p, b in zip(per, bases))
        mean_del = float(np.mean([p["deletion_auc"] for p in per]))
        ok = c["ratio_to_forward"] <= max_ratio and dele and ins and point
        if ok:
            eligible[row] = mean_del
        lines.append(f"| {row} | {c['ratio_to_forward']:.2f}x | {'yes' if dele else 'no'} | {'yes' if ins else 'no'} | "
                     f"{'yes' if point else 'no'} | {mean_del:.3f} | {'yes' if ok else 'no'} |")
    best = {}
    for m in ("medgrad", "grad_eclip"):
        mine = [r for r in eligible if r.split("@")[0] == m]
        best[m] = min(mine, key=eligible.get) if mine else None
    data["choice"] = best
    return lines + ["", "Chosen, per method (the lowest mean deletion AUC among its eligible rows): "
                    + ", ".join(f"{m} **{r or 'none'}**" for m, r in best.items()) + ".", ""]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed-bases", default="5,6", help="validation phantom seed bases (the held-out set is explain.py's)")
    ap.add_argument("--n-images", type=int, default=20, help="images per family and seed base")
    ap.add_argument("--gradients", default="exact,direct",
                    help="(E3) variants: exact (a backward through the blocks), direct (the residual path only)")
    ap.add_argument("--cost-objects", type=int, default=8, help="objects timed (half chest, half derm; 0: no timing)")
    ap.add_argument("--repeats", type=int, default=5, help="interleaved timing repeats per object")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(RESULTS / "explain_blocks"))
    a = ap.parse_args(argv)
    bases = [int(b) for b in a.seed_bases.split(",")]
    gradients = tuple(a.gradients.split(","))
    if any(b == 70 for b in bases):
        ap.error("seed base 70 is the held-out set of explain.py: choose on other bases")
    torch.set_num_threads(a.threads)
    t0 = time.time()
    bundle = load_clip(None, device="cpu")
    depth = len(bundle.model.vision_model.encoder.layers)
    fracs = np.round(np.arange(0, 1 + 1e-9, 0.1), 6)
    rng = np.random.default_rng(0)
    lines = [header("How many vision blocks to explain over: validation phantoms"),
             f"- model: `{bundle.path}` ({depth} vision blocks), CPU; objects as in `benchmarks/explain.py` "
             f"({a.n_images} chest and {a.n_images} derm phantoms per seed base, bases {a.seed_bases}; the held-out "
             "set is base 70); deletion / insertion to the image's mean colour on p(target) among its rivals.",
             "- MedGrad@k / Grad-ECLIP@k: (E3)-(E5) at each of the last k blocks, signed contributions summed before "
             "the ReLU (k = 1 is the paper's last block). Gains are paired over Grad-CAM (positive = better), 95% "
             "bootstrap CI. \":direct\": (E3) along the direct residual path (`gradient=\"direct\"`: no backward "
             "through the blocks), else by a backward through them.", ""]
    data = {"args": vars(a), "depth": depth, "bases": {}}
    for base in bases:
        res = run_base(bundle, base, a.n_images, depth, fracs, gradients)
        gc = {k: np.array(v, float) for k, v in res["gradcam"].items()}
        lines += [f"## Seed base {base} ({len(gc['deletion_auc'])} objects)", "",
                  "| map | deletion AUC | insertion AUC | pointing | all-zero maps | deletion gain vs Grad-CAM | "
                  "insertion gain vs Grad-CAM |", "|---|---|---|---|---|---|---|"]
        summary = {}
        for name, r in res.items():
            v = {k: np.array(x, float) for k, x in r.items()}
            dd, di = gc["deletion_auc"] - v["deletion_auc"], v["insertion_auc"] - gc["insertion_auc"]
            summary[name] = {"deletion_auc": float(v["deletion_auc"].mean()),
                             "insertion_auc": float(v["insertion_auc"].mean()), "pointing": float(v["pointing"].mean()),
                             "zero_maps": int(v["zero_map"].sum()), "deletion_gain": float(dd.mean()),
                             "deletion_gain_ci95": boot_ci(dd, rng), "insertion_gain": float(di.mean()),
                             "insertion_gain_ci95": boot_ci(di, rng)}
            s = summary[name]
            lines.append(f"| {name} | {s['deletion_auc']:.3f} | {s['insertion_auc']:.3f} | {s['pointing']:.3f} | "
                         f"{s['zero_maps']} | " + (" | ".join(
                             f"{s[g]:+.3f} [{s[g + '_ci95'][0]:+.3f}, {s[g + '_ci95'][1]:+.3f}]"
                             for g in ("deletion_gain", "insertion_gain")) if name != "gradcam" else "- | -") + " |")
        best = {m: min((r for r in summary if r.split("@")[0] == m), key=lambda r: summary[r]["deletion_auc"])
                for m in ("medgrad", "grad_eclip")}
        lines += ["", "Lowest deletion AUC: " + ", ".join(best.values()) + ".", ""]
        data["bases"][base] = {"summary": summary, "best_k_by_deletion": best}
    if a.cost_objects:
        lines += cost_section(bundle, bases[0], depth, gradients, a.cost_objects, a.repeats, a.threads, data)
        lines += choice_section(data)
    lines += [f"Run time: {time.time() - t0:.0f}s.", ""]
    write_results(a.out, lines, data)


if __name__ == "__main__":
    main()
