"""How many vision blocks to explain over (the `blocks` option of `clinlens.explain.grad_eclip.explain`),
chosen on validation phantoms, never the held-out set: for k = 1 .. the tower's depth, MedGrad and
Grad-ECLIP summed over the last k blocks, against Grad-CAM and a random map, on the objects of
benchmarks/explain.py drawn from other seed bases (default 5 and 6). Deletion / insertion as
`explain.py --baseline mean --score probability` (patches replaced by the image's mean colour; score =
the target's probability among its rivals), pointing game, all-zero maps; paired gains over Grad-CAM with
95% bootstrap CIs. Writes benchmarks/results/explain_blocks.md and .json.
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
from explain import boot_ci, heatmap, map_metrics, objects, rivals, scores  # noqa: E402

from clinlens.explain.grad_eclip import resolve_target  # noqa: E402
from clinlens.models.clip import load_clip  # noqa: E402

BASELINES = ("gradcam", "random")


def run_base(bundle, base: int, n_images: int, depth: int, fracs) -> dict:
    """Per method row name ("medgrad@k", "grad_eclip@k", "gradcam", "random"): per-object metrics."""
    names = list(BASELINES) + [f"{m}@{k}" for m in ("medgrad", "grad_eclip") for k in range(1, depth + 1)]
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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed-bases", default="5,6", help="validation phantom seed bases (the held-out set is explain.py's)")
    ap.add_argument("--n-images", type=int, default=20, help="images per family and seed base")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(RESULTS / "explain_blocks"))
    a = ap.parse_args(argv)
    bases = [int(b) for b in a.seed_bases.split(",")]
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
             "bootstrap CI.", ""]
    data = {"args": vars(a), "depth": depth, "bases": {}}
    for base in bases:
        res = run_base(bundle, base, a.n_images, depth, fracs)
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
        best = {m: min(range(1, depth + 1), key=lambda k: summary[f"{m}@{k}"]["deletion_auc"])
                for m in ("medgrad", "grad_eclip")}
        lines += ["", "Lowest deletion AUC at k = " + ", ".join(f"{best[m]} ({m})" for m in best) + ".", ""]
        data["bases"][base] = {"summary": summary, "best_k_by_deletion": best}
    lines += [f"Run time: {time.time() - t0:.0f}s.", ""]
    write_results(a.out, lines, data)


if __name__ == "__main__":
    main()
