"""Interactive segmentation on held-out phantoms (methods.md §1 metrics): clinlens vs random walker vs region growing.

2D objects: every present chest finding (256 px), the derm lesion and its 'pigment network' /
'blue-white veil' (256 px), CT findings on their largest axial slice (48x128x128 volumes).
Click 1 is the same for every method (`center_click` of the object, rng seeded per object); each
next click is `error_click` on that method's own current prediction (NoC protocol: every method
gets its own corrective sequence). A sequence stops at 20 clicks, or once Dice >= 0.90 with at
least 5 clicks (later clicks hold that Dice). 3D: CT findings, clinlens `predict_3d` re-run with
all clicks, each corrective click on the slice with the largest error; random walker and region growing in 3D.
Writes benchmarks/results/interactive_seg.md, .json and .png.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage as ndi
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, header  # noqa: E402

from clinlens.data.image_io import to_unit_rgb  # noqa: E402
from clinlens.data.phantoms import make_ct  # noqa: E402
from clinlens.models.clip import load_clip  # noqa: E402
from clinlens.models.region_predictor import RegionPredictor  # noqa: E402
from clinlens.trainers.region_seg import center_click, error_click, phantom_region_examples  # noqa: E402

HELD_OUT = 70  # phantom seeds HELD_OUT * 1_000_003 + 900_000 + i >= 70_900_210 (training: seed 0 -> 900_000 + i)
FAMILIES = ("chest", "derm", "ct")
THRESHOLDS = (0.85, 0.90)


def held_out_seed(i: int) -> int:
    return HELD_OUT * 1_000_003 + 900_000 + i


def ct_objects(n: int, shape=(48, 128, 128), min_pixels: int = 12):
    """Yield (object id, HU volume, name, 3D mask) for the findings of held-out CT volumes until `n` objects."""
    count = 0
    for i in range(10 * n + 10):
        s = make_ct(held_out_seed(i), shape=tuple(shape))
        for name, m in s.masks.items():
            if m.sum(axis=(1, 2)).max() >= min_pixels:
                yield f"ct{i}:{name}", s.image, name, m.astype(bool)
                count += 1
                if count >= n:
                    return


def objects_2d(fam: str, n: int, size: int = 256, ct_shape=(48, 128, 128)):
    """Yield (object id, float [H, W, 3] image, mask, name) of held-out objects of a family (CT: largest slice)."""
    if fam == "ct":
        for oid, vol, name, m in ct_objects(n, ct_shape):
            z = int(np.argmax(m.sum(axis=(1, 2))))
            yield oid, to_unit_rgb(vol[z]), m[z], name
        return
    for i, (img, m, cap) in enumerate(phantom_region_examples(HELD_OUT, n, size, families=(fam,), propagation=False)):
        yield f"{fam}{i}", img, m, cap


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    return float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))


def _grey(img: np.ndarray) -> np.ndarray:
    return img[..., 0] if np.allclose(img[..., 0], img[..., 1]) and np.allclose(img[..., 0], img[..., 2]) else img


def border_markers(shape) -> np.ndarray:
    lab = np.full(shape, 2, np.int32)
    lab[tuple(slice(1, -1) for _ in shape)] = 0
    return lab


def random_walker_seg(data: np.ndarray, fg, bg, beta: float, rgb: bool = False) -> np.ndarray:
    """scikit-image random walker: fg clicks = 1, bg clicks and the image/volume border = 2. Points in (x, y[, z])."""
    from skimage.segmentation import random_walker

    lab = border_markers(data.shape[:-1] if rgb else data.shape)
    for pts, v in ((bg, 2), (fg, 1)):
        for p in pts:
            lab[tuple(int(round(c)) for c in p[::-1])] = v
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return random_walker(data, lab, beta=beta, mode="cg_j", channel_axis=-1 if rgb else None) == 1


def region_grow(grey: np.ndarray, fg, bg, k: float = 2.5, r: int = 4, t_min: float = 0.03) -> np.ndarray:
    """Seeded region growing (2D or 3D): flood from each fg click on the smoothed image with tolerance k x std
    of its (2r+1)^d neighbourhood + t_min, halved until the flood holds no click of the other label; minus the
    bg floods. Points in (x, y[, z])."""
    from skimage.segmentation import flood

    g = ndi.gaussian_filter(grey.astype(np.float64), 1.0)
    idx = lambda p: tuple(int(round(c)) for c in p[::-1])  # noqa: E731

    def grow(pts, avoid):
        out = np.zeros(g.shape, bool)
        for c in map(idx, pts):
            tol = k * g[tuple(slice(max(v - r, 0), v + r + 1) for v in c)].std() + t_min
            for _ in range(10):
                f = flood(g, c, tolerance=tol)
                if not any(f[q] for q in map(idx, avoid)):
                    break
                tol /= 2
            out |= f
        return out

    return grow(fg, bg) & ~grow(bg, fg)


def methods_2d(pred: RegionPredictor, beta: float) -> dict:
    """name -> f(image, key, fg, bg, previous mask) -> bool mask."""
    def clinlens(img, key, fg, bg, prev):
        return pred.predict(img, key, fg, bg, mask_prompt=prev)["mask"]

    def clicks_only(img, key, fg, bg, prev):
        return pred.predict(img, ("clicks only", key), fg, bg)["mask"]

    def rw(img, key, fg, bg, prev):
        g = _grey(img)
        return random_walker_seg(g, fg, bg, beta, rgb=g.ndim == 3)

    def grow(img, key, fg, bg, prev):
        return region_grow(img.mean(-1), fg, bg)

    return {"clinlens": clinlens, "clinlens, no mask prompt (ablation)": clicks_only, "random walker": rw,
            "region growing": grow}


def click_session(segment, target: np.ndarray, first, max_clicks: int, err_click=error_click,
                  stop: float = THRESHOLDS[-1], min_clicks: int = 5):
    """Run one NoC session -> (Dice after each of `max_clicks` clicks (held after a stop), seconds per click,
    (fg, bg) clicks)."""
    fg, bg, prev, dices, secs = [first], [], None, [], []
    for k in range(1, max_clicks + 1):
        t0 = time.perf_counter()
        prev = segment(fg, bg, prev)
        secs.append(time.perf_counter() - t0)
        dices.append(dice(prev, target))
        if k == max_clicks or (dices[-1] >= stop and k >= min_clicks):
            break
        c = err_click(prev, target)
        if c is None:
            break
        (fg if c[1] else bg).append(c[0])
    return dices + [dices[-1]] * (max_clicks - len(dices)), float(np.mean(secs)), (fg, bg)


def noc(dices, thr: float, cap: int) -> int:
    hit = [k + 1 for k, d in enumerate(dices[:cap]) if d >= thr]
    return hit[0] if hit else cap


def error_click_3d(pred: np.ndarray, target: np.ndarray):
    """`error_click` on the slice with the largest error -> ((x, y, z), label) or None."""
    err = (pred ^ target).sum(axis=(1, 2))
    if not err.any():
        return None
    z = int(np.argmax(err))
    (x, y), label = error_click(pred[z], target[z])
    return (x, y, float(z)), label


def summarise(rows, max_clicks):
    """rows: list of (family, method, dices, sec, name) -> {(family, method): metrics} incl. family 'all'."""
    out = {}
    for fam in (*FAMILIES, "all"):
        for meth in dict.fromkeys(r[1] for r in rows):
            sel = [r for r in rows if r[1] == meth and (fam == "all" or r[0] == fam)]
            if not sel:
                continue
            D = np.array([r[2] for r in sel])
            out[(fam, meth)] = {"n": len(sel), "curve": D.mean(0).tolist(),
                                **{f"dice@{k}": float(D[:, k - 1].mean()) for k in (1, 3, 5) if k <= max_clicks},
                                **{f"noc@{int(t * 100)}": float(np.mean([noc(d, t, max_clicks) for d in D]))
                                   for t in THRESHOLDS},
                                "ms_per_click": 1e3 * float(np.mean([r[3] for r in sel]))}
    return out


def add_common_args(ap, name: str):
    """--model, --region, --size, --threads, --out (shared with region_recognition.py)."""
    ap.add_argument("--model", default=None, help="HF CLIP dir (default: the embedded default)")
    ap.add_argument("--region", default=None, help="region.safetensors (default: the one in the CLIP dir)")
    ap.add_argument("--size", type=int, default=256, help="chest and derm image size")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(RESULTS / name))


def load_predictor(a):
    """Set torch threads; (ClipBundle on CPU, RegionPredictor) from the parsed args."""
    torch.set_num_threads(a.threads)
    bundle = load_clip(a.model, device="cpu")
    return bundle, RegionPredictor.from_bundle(bundle, a.region)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap, "interactive_seg")
    ap.add_argument("--n", type=int, default=20, help="2D objects per family")
    ap.add_argument("--n-3d", type=int, default=8, help="CT objects for the 3D protocol")
    ap.add_argument("--max-clicks", type=int, default=20)
    ap.add_argument("--clicks-3d", type=int, default=5)
    ap.add_argument("--beta", type=float, default=130.0, help="random walker beta")
    a = ap.parse_args(argv)
    bundle, pred = load_predictor(a)
    meths = methods_2d(pred, a.beta)
    ct_shape = (48, 128, 128)

    rows = []
    for fi, fam in enumerate(FAMILIES):
        for j, (oid, img, m, name) in enumerate(tqdm(list(objects_2d(fam, a.n, a.size, ct_shape)), desc=f"2D {fam}")):
            first = center_click(m, np.random.default_rng([HELD_OUT, fi, j]))
            for meth, f in meths.items():
                d, sec, _ = click_session(lambda fg, bg, prev: f(img, oid, fg, bg, prev), m, first, a.max_clicks)
                rows.append((fam, meth, d, sec, name))
    res2d = summarise(rows, a.max_clicks)

    rows3d, ignored = [], [0, 0]  # clinlens bg clicks on slices without a fg click, all bg clicks
    for j, (oid, vol, name, m3) in enumerate(tqdm(list(ct_objects(a.n_3d, ct_shape)), desc="3D ct")):
        z = int(np.argmax(m3.sum(axis=(1, 2))))
        x, y = center_click(m3[z], np.random.default_rng([HELD_OUT, 3, j]))
        unit = np.stack([to_unit_rgb(s)[..., 0] for s in vol])
        seg3 = {"clinlens predict_3d": lambda fg, bg, prev: pred.predict_3d(
                    lambda k: to_unit_rgb(vol[k]), len(vol), oid, fg, bg)["mask"],
                "random walker 3D": lambda fg, bg, prev: random_walker_seg(unit, fg, bg, a.beta),
                "region growing 3D": lambda fg, bg, prev: region_grow(unit, fg, bg)}
        for meth, f in seg3.items():
            d, sec, (fg, bg) = click_session(f, m3, (x, y, float(z)), a.clicks_3d, err_click=error_click_3d, stop=2.0)
            if meth.startswith("clinlens"):
                ignored[0] += sum(int(b[2]) not in {int(q[2]) for q in fg} for b in bg)
                ignored[1] += len(bg)
            rows3d.append(("ct", meth, d, sec, name))
    res3d = summarise(rows3d, a.clicks_3d)

    lines = [header("Interactive segmentation on held-out phantoms (clinlens vs random walker vs region growing)"),
             f"- model: `{bundle.path}`, region model `{pred.model_path}`; torch threads {a.threads}, CPU.",
             f"- held-out phantoms: seeds {held_out_seed(0):,}+ (training uses 900,000+); chest and derm at "
             f"{a.size} px, CT volumes {ct_shape[0]}x{ct_shape[1]}x{ct_shape[2]} (2D: each finding on its largest slice).",
             "- protocol (NoC): click 1 = `center_click` of the object (same point for all methods, rng seeded per "
             "object); each next click = `error_click` (centre of the largest error region, fg or bg) on that "
             "method's own current prediction, so every method gets its own corrective sequence. clinlens gets "
             "fg/bg clicks and, from click 2 on, its previous mask as mask prompt; each object has its own image key "
             "(fresh focus window, trunk computed on click 1). Ablation row: the same clinlens without the mask "
             "prompt (all clicks only).",
             f"- random walker: scikit-image, mode cg_j, beta {a.beta:g}, markers fg clicks = 1, bg clicks and every "
             "image-border pixel = 2 (so it has background from click 1). Region growing: `skimage.segmentation.flood` "
             "on the Gaussian-smoothed (sigma 1) grey image from each fg click, tolerance 2.5 x std of its 9x9 "
             "neighbourhood + 0.03 (halved until the flood holds no bg click), minus the same floods from the bg "
             "clicks (halved until they hold no fg click).",
             f"- NoC@85/90: clicks until Dice >= 0.85/0.90, capped at {a.max_clicks} (not reached counts as "
             f"{a.max_clicks}). A session stops once Dice >= 0.90 with >= 5 clicks (later clicks hold that Dice).",
             "", "## 2D", "",
             "| family | method | objects | Dice@1 | Dice@3 | Dice@5 | NoC@85 | NoC@90 | ms/click |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (fam, meth), r in res2d.items():
        b = "**" if fam == "all" else ""
        lines.append(f"| {b}{fam}{b} | {meth} | {r['n']} | {r['dice@1']:.3f} | {r['dice@3']:.3f} | {r['dice@5']:.3f} | "
                     f"{r['noc@85']:.2f} | {r['noc@90']:.2f} | {r['ms_per_click']:.0f} |")
    lines += ["", "Per object type (derm lesions under their diagnosis), Dice after 1 / 3 / 5 clicks (NoC@90):", "",
              "| family | object | n | " + " | ".join(meths) + " |", "|---|---|---|" + "---|" * len(meths)]
    for fam, name in dict.fromkeys((r[0], r[4]) for r in rows):
        cells = []
        for meth in meths:
            D = np.array([r[2] for r in rows if r[:2] == (fam, meth) and r[4] == name])
            cells.append(" / ".join(f"{D[:, k - 1].mean():.2f}" for k in (1, 3, 5)) +
                         f" ({np.mean([noc(d, 0.9, a.max_clicks) for d in D]):.1f})")
        lines.append(f"| {fam} | {name} | {len(D)} | " + " | ".join(cells) + " |")
    cl, rw = res2d[("all", "clinlens")], res2d[("all", "random walker")]
    ok = cl["dice@3"] >= 0.85 and cl["dice@3"] > rw["dice@3"]
    lines += ["", f"Target Dice@3 >= 0.85 and above random walker: clinlens {cl['dice@3']:.3f} vs random walker "
              f"{rw['dice@3']:.3f} -> **{'met' if ok else 'missed'}**.", "",
              "## 3D (CT volumes)", "",
              f"clinlens: `predict_3d` from one center click on the largest slice, then corrective clicks (`error_click` "
              f"on the slice with the largest error), re-running `predict_3d` with all clicks. Random walker 3D and region growing 3D: same "
              f"protocol on the HU-windowed volume (random walker: volume border = background). {a.clicks_3d} clicks.", "",
              "| method | objects | 3D Dice@1 | 3D Dice@3 | 3D Dice@5 | s/click |", "|---|---|---|---|---|---|"]
    for (fam, meth), r in res3d.items():
        if fam == "ct":
            lines.append(f"| {meth} | {r['n']} | {r['dice@1']:.3f} | {r.get('dice@3', float('nan')):.3f} | "
                         f"{r.get('dice@5', float('nan')):.3f} | {r['ms_per_click'] / 1e3:.2f} |")
    lines += ["", f"clinlens 3D: {ignored[0]} of its {ignored[1]} background clicks fell on a slice with no foreground "
              "click; `predict_3d` makes such a slice an anchor (its propagated mask refined by the click, then "
              "re-propagated over the slices nearer to it than to any other anchor).",
              "", "ms/click and s/click are wall times of this run (shared 2-core machine, 2 torch threads); "
              "controlled timings are in latency.md.", ""]
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(lines))
    out.with_suffix(".json").write_text(json.dumps({"2d": {f"{k[0]}|{k[1]}": v for k, v in res2d.items()},
                                                    "3d": {f"{k[0]}|{k[1]}": v for k, v in res3d.items()}}, indent=1))
    plot(res2d, a.max_clicks, out.with_suffix(".png"))
    print("\n".join(lines))


def plot(res, max_clicks, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fams = [f for f in (*FAMILIES, "all") if any(k[0] == f for k in res)]
    fig, axes = plt.subplots(1, len(fams), figsize=(3.6 * len(fams), 3.4), sharey=True)
    xs = np.arange(1, max_clicks + 1)
    for ax, fam in zip(np.atleast_1d(axes), fams):
        for (f, meth), r in res.items():
            if f == fam:
                ax.plot(xs, r["curve"], marker=".", label=meth)
        ax.axhline(0.85, color="k", ls=":", lw=1)
        ax.set_title(f"{fam} (n={next(r['n'] for k, r in res.items() if k[0] == fam)})")
        ax.set_xlabel("clicks")
        ax.set_ylim(0, 1)
    np.atleast_1d(axes)[0].set_ylabel("mean Dice")
    np.atleast_1d(axes)[-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
