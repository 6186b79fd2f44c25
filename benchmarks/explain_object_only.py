"""Where the explained score lives (a sanity check beside benchmarks/explain.py): for the same held-out
objects and the same target probability (`--score probability`), p(target) of the intact image, of the
image's mean colour, of the object's box alone on the mean colour, and of the image with the box filled by
the mean colour; then, from explain_mean_probability.json, each method's deletion/insertion AUC and heat in
that box. A map can hold much of its heat in the box and still rank the box's patches in an order the score
does not follow. Writes benchmarks/results/explain_object_only.md and .json.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, header  # noqa: E402
from explain import objects, rivals, scores  # noqa: E402

from clinlens.explain.grad_eclip import resolve_target  # noqa: E402
from clinlens.models.clip import load_clip  # noqa: E402

GROUPS = {"derm lesion (target: diagnosis)": lambda oid: oid.startswith("derm") and oid.endswith(":lesion"),
          "derm spatial concepts": lambda oid: oid.startswith("derm") and not oid.endswith(":lesion"),
          "chest findings": lambda oid: oid.startswith("chest")}
ARMS = ("intact", "mean colour", "box only", "box removed")
METHODS = ("medgrad", "grad_eclip", "gradcam", "integrated_gradients", "random")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-images", type=int, default=40, help="held-out images per family, as in explain.py")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--faithfulness", default=str(RESULTS / "explain_mean_probability.json"),
                    help="explain.py results on the same objects (mean baseline, probability score)")
    ap.add_argument("--out", default=str(RESULTS / "explain_object_only"))
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    bundle = load_clip(None, device="cpu")
    emb, rows = {}, {}
    for fam in ("chest", "derm"):
        for oid, img, text, mask, (x0, y0, x1, y1) in objects(fam, a.n_images, 224):
            for t in [text] + rivals(text):
                emb.setdefault(t, resolve_target(bundle, t).embedding)
            box = np.zeros(img.shape[:2] + (1,), bool)
            box[y0:y1, x0:x1] = True
            mean = np.broadcast_to(img.mean((0, 1)), img.shape).astype(img.dtype)
            p = scores(bundle, [img, mean, np.where(box, img, mean), np.where(box, mean, img)],
                       torch.stack([emb[t] for t in [text] + rivals(text)]))
            rows[oid] = {"p": dict(zip(ARMS, map(float, p))), "box_share": float(box.mean())}
    faith = {o["id"]: o for o in json.loads(Path(a.faithfulness).read_text())["objects"]}
    lines = [header("Where the explained score lives: the object's box alone and removed"),
             "- model: the embedded default CLIP; objects: those of `benchmarks/explain.py` (held-out phantoms, "
             f"{a.n_images} images per family, 224 px); score: p(target) = softmax over the target and its rivals, "
             "as `explain.py --score probability`.",
             "- arms: the intact image; the image's mean colour everywhere; the object's box kept on the mean "
             "colour; the box filled with the mean colour. Method columns from "
             f"`{Path(a.faithfulness).name}` (deletion/insertion to the mean colour; energy-in-box on the same box).",
             "", "| objects | n | box share | " + " | ".join(f"p {x}" for x in ARMS) + " |",
             "|---|---|---|" + "---|" * len(ARMS)]
    out = {}
    for name, sel in GROUPS.items():
        ids = [i for i in rows if sel(i)]
        p = {x: float(np.mean([rows[i]["p"][x] for i in ids])) for x in ARMS}
        share = float(np.mean([rows[i]["box_share"] for i in ids]))
        out[name] = {"n": len(ids), "box_share": share, "p": p, "methods": {
            m: {k: float(np.mean([faith[i]["methods"][m][k] for i in ids if i in faith]))
                for k in ("deletion_auc", "insertion_auc", "energy_in_box")} for m in METHODS}}
        lines.append(f"| {name} | {len(ids)} | {share:.3f} | " + " | ".join(f"{p[x]:.3f}" for x in ARMS) + " |")
    lines += ["", "| objects | method | deletion AUC (lower better) | insertion AUC (higher better) | energy-in-box |",
              "|---|---|---|---|---|"]
    for name, r in out.items():
        for m, v in r["methods"].items():
            lines.append(f"| {name} | {m} | {v['deletion_auc']:.3f} | {v['insertion_auc']:.3f} | "
                         f"{v['energy_in_box']:.2f} |")
    lines.append("")
    dst = Path(a.out)
    dst.with_suffix(".md").write_text("\n".join(lines))
    dst.with_suffix(".json").write_text(json.dumps({"args": vars(a), "groups": out, "objects": rows}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
