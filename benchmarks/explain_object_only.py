"""Where the explained score lives (a sanity check beside benchmarks/explain.py): for the same held-out
objects and the same target probability (`--score probability`), p(target) of the intact image, of the
image's mean colour, of the object's box alone on the mean colour, and of the image with the box filled by
the mean colour; then, from explain_mean_probability.json, each method's deletion/insertion AUC and heat in
that box; and where MedGrad's and Grad-ECLIP's hottest patches lie on the derm lesions (interior, border
ring, outside) and how many patches carry heat at all. A map can hold much of its heat in the box and still
rank the box's patches in an order the score does not follow. Writes benchmarks/results/explain_object_only.md and .json.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage as ndi

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, header, write_results  # noqa: E402
from explain import ALL_BLOCKS, method_blocks, objects, rivals, scores  # noqa: E402

from clinlens.explain.grad_eclip import explain, resolve_target  # noqa: E402
from clinlens.models.clip import load_clip  # noqa: E402

GROUPS = {"derm lesion (target: diagnosis)": lambda oid: oid.startswith("derm") and oid.endswith(":lesion"),
          "derm spatial concepts": lambda oid: oid.startswith("derm") and not oid.endswith(":lesion"),
          "chest findings": lambda oid: oid.startswith("chest")}
ARMS = ("intact", "mean colour", "box only", "box removed")
OURS = ("medgrad", "grad_eclip") + ALL_BLOCKS
METHODS = OURS + ("gradcam", "integrated_gradients", "random")
PLACES = ("interior", "border", "outside")
EDGE_PX = 8  # the lesion's border ring: within this many pixels of its edge


def place(mask: np.ndarray, inner: np.ndarray, cell: tuple) -> str:
    """Where a patch lies: mostly in the lesion's interior, touching the lesion otherwise, or outside it."""
    return "interior" if inner[cell].mean() > 0.5 else "border" if mask[cell].any() else "outside"


def where_maps_look(bundle, lesions, top: int = 5, keep: int = 4) -> dict:
    """Per method: non-zero patches per map, and where the `top` hottest non-zero patches lie, against all patches.
    The first `keep` lesions' maps are returned under "examples" (for the figure)."""
    methods = OURS
    out = {k: dict.fromkeys(PLACES, 0) for k in ("all patches",) + methods}
    nonzero = {m: [] for m in methods}
    examples = []
    for img, emb, mask in lesions:
        inner = ndi.binary_erosion(mask, iterations=EDGE_PX)
        maps = {}
        for m in methods:
            meth, blocks, gradient = method_blocks(bundle, m)
            maps[m] = explain(bundle, image=img, target_embedding=emb, method=meth, words=False, blocks=blocks,
                              gradient=gradient)["heatmap"]
        gh, gw = maps["medgrad"].shape
        ph, pw = img.shape[0] // gh, img.shape[1] // gw
        places = [place(mask, inner, np.s_[y * ph:(y + 1) * ph, x * pw:(x + 1) * pw]) for y in range(gh) for x in range(gw)]
        if len(examples) < keep:
            examples.append((img, mask, maps))
        for p in places:
            out["all patches"][p] += 1
        for m, heat in maps.items():
            flat = heat.ravel()
            nonzero[m].append(int((flat > 0).sum()))
            for t in [t for t in np.argsort(-flat)[:top] if flat[t] > 0]:
                out[m][places[t]] += 1
    shares = {k: {p: v[p] / max(sum(v.values()), 1) for p in PLACES} for k, v in out.items()}
    return {"shares": shares, "nonzero_patches": {m: float(np.mean(v)) for m, v in nonzero.items()},
            "empty_maps": {m: int(sum(n == 0 for n in v)) for m, v in nonzero.items()}, "maps": len(lesions),
            "patches": int(sum(out["all patches"].values())), "top": top, "examples": examples}


def plot(out: Path, faith: dict, examples) -> Path:
    """Mean deletion / insertion curves of the faithfulness run, and a few derm lesions' maps, last block
    against all blocks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = ("medgrad", "medgrad_all", "gradcam", "integrated_gradients", "random")
    cols = ("image",) + OURS[:1] + ALL_BLOCKS[:1]
    fig = plt.figure(figsize=(11, 3 + 2.2 * len(examples)))
    grid = fig.add_gridspec(1 + len(examples), 2 * len(cols), height_ratios=[1.4] + [1] * len(examples))
    x = faith["fractions"]
    for j, kind in enumerate(("deletion", "insertion")):
        ax = fig.add_subplot(grid[0, j * len(cols):(j + 1) * len(cols)])
        for m in shown:
            ax.plot(x, faith["mean_curves"][m][kind], label=m, lw=2 if m.startswith("medgrad") else 1)
        ax.set(title=f"{kind} ({'lower' if kind == 'deletion' else 'higher'} area is better)",
               xlabel="share of patches removed" if kind == "deletion" else "share of patches restored",
               ylabel="p(target)")
        if j:
            ax.legend(fontsize=7)
    for r, (img, mask, maps) in enumerate(examples):
        for c, name in enumerate(cols):
            ax = fig.add_subplot(grid[1 + r, 2 * c:2 * c + 2])
            ax.imshow(img)
            if name != "image":
                h = np.kron(maps[name], np.ones((img.shape[0] // maps[name].shape[0],) * 2))
                ax.imshow(h, cmap="jet", alpha=0.45, vmin=0, vmax=1)
                ax.set_title(f"{name}{' (empty)' if maps[name].max() <= 0 else ''}", fontsize=8)
            ax.contour(mask, levels=[0.5], colors="w", linewidths=0.8)
            ax.axis("off")
    fig.tight_layout()
    path = Path(out).with_suffix(".png")
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-images", type=int, default=40, help="held-out images per family, as in explain.py")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--faithfulness", default=str(RESULTS / "explain_mean_probability.json"),
                    help="explain.py results on the same objects (mean baseline, probability score)")
    ap.add_argument("--out", default=str(RESULTS / "explain_object_only"))
    a = ap.parse_args(argv)
    if not Path(a.faithfulness).is_file():
        ap.error(f"--faithfulness {a.faithfulness} not found: run `python benchmarks/explain.py --baseline mean "
                 "--score probability --no-cost --out benchmarks/results/explain_mean_probability` first")
    torch.set_num_threads(a.threads)
    bundle = load_clip(None, device="cpu")
    emb, rows, lesions = {}, {}, []
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
            if GROUPS["derm lesion (target: diagnosis)"](oid):
                lesions.append((img, emb[text], mask))
    faith_run = json.loads(Path(a.faithfulness).read_text())
    faith = {o["id"]: o for o in faith_run["objects"]}
    if missing := sorted(set(rows) - set(faith)):
        sys.exit(f"{a.faithfulness} lacks {len(missing)} of these objects (e.g. {missing[0]}): "
                 f"run explain.py with the same --n-images ({a.n_images})")
    if lacking := [m for m in METHODS if m not in next(iter(faith.values()))["methods"]]:
        sys.exit(f"{a.faithfulness} has no rows for {', '.join(lacking)}: rerun explain.py (it now adds them)")
    look = where_maps_look(bundle, lesions)
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
            m: {k: float(np.mean([faith[i]["methods"][m][k] for i in ids]))
                for k in ("deletion_auc", "insertion_auc", "energy_in_box")} for m in METHODS}}
        lines.append(f"| {name} | {len(ids)} | {share:.3f} | " + " | ".join(f"{p[x]:.3f}" for x in ARMS) + " |")
    lines += ["", "| objects | method | deletion AUC (lower better) | insertion AUC (higher better) | energy-in-box |",
              "|---|---|---|---|---|"]
    for name, r in out.items():
        for m, v in r["methods"].items():
            lines.append(f"| {name} | {m} | {v['deletion_auc']:.3f} | {v['insertion_auc']:.3f} | "
                         f"{v['energy_in_box']:.2f} |")
    g = look["shares"]["all patches"]
    lines += ["", f"Where the maps look on the {len(lesions)} derm lesions: the {look['top']} hottest non-zero patches of "
              f"each map, by place (interior = at least half inside the lesion shrunk by {EDGE_PX} px; border = "
              "touching the lesion otherwise), against all patches.", "",
              "| map | empty maps | non-zero patches per map (of 196) | interior | border | outside |",
              "|---|---|---|---|---|---|",
              f"| all patches (reference) | – | – | {g['interior']:.3f} | {g['border']:.3f} | {g['outside']:.3f} |"]
    for m in OURS:
        v = look["shares"][m]
        lines.append(f"| {m} top {look['top']} | {look['empty_maps'][m]} / {look['maps']} | "
                     f"{look['nonzero_patches'][m]:.1f} | {v['interior']:.3f} | "
                     f"{v['border']:.3f} | {v['outside']:.3f} |")
    png = plot(a.out, faith_run, look.pop("examples"))
    lines += ["", f"![mean deletion/insertion curves and derm lesions, last block against all blocks]({png.name})", ""]
    write_results(a.out, lines, {"args": vars(a), "groups": out, "where_maps_look": look, "objects": rows})


if __name__ == "__main__":
    main()
