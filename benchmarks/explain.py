"""Explanation heatmaps on held-out phantoms (methods.md §4, issue 5): faithfulness, localisation and cost.

Same model for every method: the embedded default CLIP on CPU. Objects: every present chest finding
with a mask (target text = the finding name) and, per derm phantom, the lesion (target text = its
diagnosis) and each present spatial concept with a mask (target text = the concept name). Held-out
seeds as in interactive_seg.py (>= 70,900,210).

Methods: `clinlens.explain.grad_eclip.explain` with method medgrad / grad_eclip /
grad_eclip_single_head / attention, MedGrad and Grad-ECLIP over all vision blocks (`blocks` = the tower's
depth: each block's signed contributions summed before the ReLU; the number of blocks, 1 to 6, was chosen on
validation phantoms of seed bases 5 and 6, 20 images per family: benchmarks/explain_blocks.py), the same with
the channel weights along the direct residual path (`gradient="direct"`: no backward through the blocks), a random
map (uniform noise on the patch grid), Grad-CAM (pytorch-grad-cam on the last block's layer_norm1 with the
ViT token reshape) and captum
IntegratedGradients (32 steps from the blurred image, |attribution| summed over channels), both on
the same image-text cosine, pooled to the patch grid.

Metrics, all on the model's patch grid:
- deletion / insertion AUC: patches ranked by heat (ties broken at random, seeded per object);
  the top k% are replaced by a blurred copy of the image (deletion) or pasted onto the blurred copy
  (insertion) for k = 0, step, ..., 100; score = cos(encode_images(x), target), where the target
  embedding is `resolve_target`'s (the one `explain` explains), or with `--score probability` the
  target's zero-shot probability against its rivals (the family's other findings, diagnoses or
  concepts; RISE scores class probabilities); AUC by the trapezoid rule over the patch fraction.
  Lower deletion, higher insertion is better. `--baseline mean` replaces the patches with the image's
  mean colour instead: the blurred copy keeps the phantoms' low-frequency findings, so blurring every
  patch leaves the target's probability where it was (0.390 against 0.388 intact) and the curves
  measure little; the mean colour takes it to 0.245 (results/explain_mean*.md).
- pointing game: the heatmap's peak patch cell touches the object's mask.
- energy-in-box: heat inside the object's box / all heat, on the upsampled map `explain` returns.
Cost: per heatmap, each method timed side by side with a plain forward (`bundle.encode_images` under
no_grad) on the same input, interleaved, torch threads 1; median per object, then the median ratio.
Writes benchmarks/results/explain.md and .json.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage as ndi

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, header, write_results  # noqa: E402
from concepts import cell_box, hits  # noqa: E402
from interactive_seg import held_out_seed  # noqa: E402

from clinlens.data.image_io import to_unit_rgb  # noqa: E402
from clinlens.data.phantoms import CHEST_FINDINGS, DERM_DIAGNOSES, DERM_SPATIAL, make_chest, make_derm, mask_box  # noqa: E402
from clinlens.explain.grad_eclip import METHODS, _upsample, clear_entropy_cache, entropy_weights, explain, resolve_target  # noqa: E402
from clinlens.models.clip import load_clip  # noqa: E402

BASELINES = ("gradcam", "integrated_gradients")
ALL_BLOCKS = ("medgrad_all", "grad_eclip_all")  # explained over every vision block
DIRECT = ("medgrad_all:direct", "grad_eclip_all:direct")  # the same, (E3) along the direct residual path
OURS = ("medgrad", "grad_eclip") + ALL_BLOCKS + DIRECT
ALL = list(METHODS) + list(BASELINES) + ["random"] + list(ALL_BLOCKS) + list(DIRECT)  # appended: earlier rows' seeds stay
TIMED = [m for m in ALL if m != "random"]
# + MedGrad with the entropy computed before the forward in the calling thread, and for another target of
# an image already explained (its entropy weights kept)
COST_ROWS = TIMED[:1] + ["medgrad_serial", "medgrad_cached"] + TIMED[1:]
LABEL = {"medgrad": "MedGrad E-CLIP", "grad_eclip": "Grad-ECLIP (multi-head)",
         "grad_eclip_single_head": "Grad-ECLIP single-head (public code)",
         "attention": "raw last-layer attention", "random": "random map",
         "medgrad_all": "MedGrad E-CLIP, all blocks", "grad_eclip_all": "Grad-ECLIP (multi-head), all blocks",
         "medgrad_all:direct": "MedGrad E-CLIP, all blocks, direct gradient",
         "grad_eclip_all:direct": "Grad-ECLIP (multi-head), all blocks, direct gradient",
         "gradcam": "Grad-CAM (pytorch-grad-cam, ViT reshape)", "integrated_gradients": "IntegratedGradients (captum)",
         "medgrad_cached": "MedGrad E-CLIP, another target of the same image (entropy weights kept)",
         "medgrad_serial": "MedGrad E-CLIP, entropy in the calling thread before the forward (one thread)"}
IG_STEPS = 32


class _Cosine(torch.nn.Module):
    """pixels -> (B, 1) cosine with a fixed target embedding: the score every method explains."""

    def __init__(self, bundle, emb):
        super().__init__()
        object.__setattr__(self, "bundle", bundle)
        self.clip = bundle.model  # a submodule, so pytorch-grad-cam finds the parameters and device
        self.register_buffer("emb", emb.detach().float())

    def forward(self, pv):
        return (self.bundle.encode_images(pv) @ self.emb.to(pv))[:, None]


def baseline_map(bundle, method, pv, emb, base_pv, grid) -> np.ndarray:
    """Grad-CAM or IntegratedGradients on the patch grid, in [0, 1]."""
    model = _Cosine(bundle, emb)
    x = pv.detach().clone().requires_grad_(True)
    if method == "gradcam":
        from pytorch_grad_cam import GradCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        g = grid

        def reshape(t):  # drop [CLS], tokens -> (B, D, h, w)
            return t[:, 1:, :].reshape(t.size(0), g[0], g[1], t.size(2)).permute(0, 3, 1, 2)

        layer = bundle.model.vision_model.encoder.layers[-1].layer_norm1
        with GradCAM(model=model, target_layers=[layer], reshape_transform=reshape) as cam:
            m = torch.from_numpy(cam(input_tensor=x, targets=[ClassifierOutputTarget(0)])[0]).float()
    else:
        from captum.attr import IntegratedGradients

        attr = IntegratedGradients(model).attribute(x, baselines=base_pv, target=0, n_steps=IG_STEPS)
        m = attr.detach().abs().sum(1)[0].float()
    h = torch.nn.functional.adaptive_avg_pool2d(m[None, None], grid)[0, 0]
    h = h.clamp(min=0)
    return (h / h.max() if h.max() > 0 else h).numpy()
MIN_PIXELS = 12


def phantom_seed(i: int, base: int | None = None) -> int:
    """Seed of phantom i: the held-out set (interactive_seg.py's) by default, or another seed base (validation)."""
    return held_out_seed(i) if base is None else base * 1_000_003 + 900_000 + i


def objects(fam: str, n_images: int, size: int, base: int | None = None):
    """Yield (object id, unit RGB image, target text, mask, box) for `n_images` held-out images with objects."""
    used = 0
    for i in range(20 * n_images + 20):
        if used >= n_images:
            return
        seed = phantom_seed(i, base)
        if fam == "chest":
            s = make_chest(seed, size=size)
            objs = [(f, f, s.masks.get(f)) for f in CHEST_FINDINGS if s.concepts.get(f)]
        else:
            s = make_derm(seed, size=size)
            objs = [(s.diagnosis, "lesion", s.masks.get("lesion"))]
            objs += [(c, c, s.masks.get(c)) for c in DERM_SPATIAL if s.concepts.get(c)]
        objs = [(t, k, m.astype(bool)) for t, k, m in objs if m is not None and m.sum() >= MIN_PIXELS]
        if not objs:
            continue
        used += 1
        img = to_unit_rgb(s.image)
        for t, k, m in objs:
            yield f"{fam}{i}:{k}", img, t, m, mask_box(m)


def ranking(heat: np.ndarray, rng) -> np.ndarray:
    """Flat patch indices, hottest first; ties in random order."""
    h = heat.ravel()
    return np.lexsort((rng.random(h.size), -h))


def patch_mask(order: np.ndarray, k: int, grid, size) -> np.ndarray:
    """(H, W) bool: the pixels of the first k patches of `order`."""
    g = np.zeros(grid[0] * grid[1], bool)
    g[order[:k]] = True
    g = g.reshape(grid)
    ry, rx = -(-size[0] // grid[0]), -(-size[1] // grid[1])
    return np.kron(g, np.ones((ry, rx), bool))[: size[0], : size[1]]


@torch.no_grad()
def scores(bundle, imgs: list[np.ndarray], emb: torch.Tensor) -> np.ndarray:
    """cos(image, emb) for a (D,) target; for a (K, D) stack, p(row 0) = softmax(logit_scale * cos)[0]."""
    pv = bundle.pixel_values(np.stack(imgs))
    cos = bundle.encode_images(pv) @ emb.to(pv).T
    if emb.ndim == 1:
        return cos.float().cpu().numpy()
    return (bundle.logit_scale.to(cos) * cos).softmax(-1)[:, 0].float().cpu().numpy()


def rivals(text: str) -> list[str]:
    """What a target competes with in the probability score: the other names of its own kind."""
    for names in (CHEST_FINDINGS, DERM_DIAGNOSES, DERM_SPATIAL):
        if text in names:
            return [n for n in names if n != text]
    raise ValueError(f"no rivals for {text!r}")


def curves(bundle, img, base, order, grid, emb, fracs, ends) -> tuple[np.ndarray, np.ndarray]:
    """Deletion and insertion score curves over `fracs`; `ends` = (score of img, score of base)."""
    n = grid[0] * grid[1]
    inner = fracs[1:-1]
    dele, ins = [], []
    for f in inner:
        m = patch_mask(order, int(round(f * n)), grid, img.shape[:2])[..., None]
        dele.append(np.where(m, base, img))
        ins.append(np.where(m, img, base))
    s = scores(bundle, dele + ins, emb)
    d = np.concatenate([[ends[0]], s[: len(inner)], [ends[1]]])
    i = np.concatenate([[ends[1]], s[len(inner):], [ends[0]]])
    return d, i


def auc(y: np.ndarray, x: np.ndarray) -> float:
    return float(np.sum((y[1:] + y[:-1]) * np.diff(x)) / 2)


def energy_in_box(up: np.ndarray, box) -> float:
    tot = float(up.sum())
    x0, y0, x1, y1 = box
    return float(up[y0:y1, x0:x1].sum()) / tot if tot > 0 else 0.0


def method_blocks(bundle, kind: str) -> tuple[str, int, str]:
    """A row name -> (`explain` method, blocks, gradient): "medgrad_all" is MedGrad over every vision block,
    "medgrad@3" over the last 3; a ":direct" suffix takes (E3) along the direct residual path."""
    kind, _, gradient = kind.partition(":")
    gradient = gradient or "exact"
    if kind in ALL_BLOCKS:
        return kind.removesuffix("_all"), len(bundle.model.vision_model.encoder.layers), gradient
    if "@" in kind:
        meth, k = kind.split("@")
        return meth, int(k), gradient
    return kind, 1, gradient


def map_metrics(bundle, h, img, base, emb, fracs, ends, mask, rng) -> dict:
    """Deletion / insertion curves and AUCs, pointing game and emptiness of one grid heatmap `h`."""
    grid = h.shape
    d, i = curves(bundle, img, base, ranking(h, rng), grid, emb, fracs, ends)
    peak = cell_box(int(np.argmax(h)), grid, img.shape[0])
    return {"deletion_auc": auc(d, fracs), "insertion_auc": auc(i, fracs),
            "pointing": bool(h.max() > 0 and hits(peak, mask)), "zero_map": bool(h.max() <= 0),
            "deletion": d.tolist(), "insertion": i.tolist()}


def heatmap(bundle, method, pv, img, tgt, rng, grid, base_pv=None):
    """(grid heatmap in [0, 1], upsampled map, explain output or None)."""
    if method in ("random",) + BASELINES:
        h = (rng.random(grid).astype(np.float32) if method == "random"
             else baseline_map(bundle, method, pv, tgt.embedding, base_pv, grid).astype(np.float32))
        return h, _upsample(torch.from_numpy(h), img.shape[:2]).numpy(), None
    meth, blocks, gradient = method_blocks(bundle, method)
    out = explain(bundle, pv, target_embedding=tgt.embedding, method=meth, image=img, words=False, blocks=blocks,
                  gradient=gradient)
    return out["heatmap"], out["upsampled"], out


def time_costs(bundle, items, repeats: int, seed: int, methods=COST_ROWS) -> dict:
    """Median seconds per call for each method and the plain forward, interleaved per object.

    Every MedGrad row computes the image's entropy weights every time, on a worker thread beside the forward
    (the app's default), except "medgrad_serial" (before it, in the calling thread) and "medgrad_cached"
    (finds them kept, as for a second target asked of an image)."""
    rng = np.random.default_rng(seed)
    kinds = ["forward"] + list(methods)
    per = {k: [] for k in kinds}  # per object: median seconds

    def prepare(kind, img):  # untimed
        if kind == "medgrad_cached":
            entropy_weights(img, (14, 14))
        elif kind.startswith("medgrad"):
            clear_entropy_cache()

    def run(kind, pv, img, emb):
        if kind == "forward":
            with torch.no_grad():
                bundle.encode_images(pv)
        elif kind in BASELINES:
            baseline_map(bundle, kind, pv, emb, torch.zeros_like(pv), (14, 14))
        else:
            method, blocks, gradient = method_blocks(bundle, kind)
            method = "medgrad" if method.startswith("medgrad") else method
            explain(bundle, pv, target_embedding=emb, method=method, image=img, words=False,
                    overlap_entropy=kind != "medgrad_serial", blocks=blocks, gradient=gradient)

    for img, emb, _ in items:
        pv = bundle.pixel_values(img)
        for k in kinds:  # warm-up
            prepare(k, img)
            run(k, pv, img, emb)
        t = {k: [] for k in kinds}
        for _ in range(repeats):
            for k in rng.permutation(kinds):
                prepare(k, img)
                t0 = time.perf_counter()
                run(k, pv, img, emb)
                t[k].append(time.perf_counter() - t0)
        for k in kinds:
            per[k].append(float(np.median(t[k])))
    fwd = np.array(per["forward"])
    return {k: {"median_ms": 1000 * float(np.median(v)), "ratio_to_forward": float(np.median(np.array(v) / fwd))}
            for k, v in per.items()}


def vit_b16_bundle():
    """A ViT-B/16-sized CLIP (random weights; cost does not depend on them) as a ClipBundle."""
    from common import vit_b16

    from clinlens.models.clip import ClipBundle, Preprocess

    return ClipBundle(model=vit_b16().clip, tokenizer=None, preprocess=Preprocess(224), path=Path("ViT-B/16 (random)"),
                      device=torch.device("cpu"))


VITB_TIMED = ("medgrad", "grad_eclip", "medgrad_all", "medgrad_all:direct", "gradcam", "integrated_gradients")


def boot_ci(x: np.ndarray, rng, n: int = 2000) -> tuple[float, float]:
    idx = rng.integers(0, len(x), (n, len(x)))
    m = x[idx].mean(1)
    return float(np.percentile(m, 2.5)), float(np.percentile(m, 97.5))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF CLIP dir (default: the embedded default CLIP)")
    ap.add_argument("--n-images", type=int, default=40, help="held-out images per family (chest, derm)")
    ap.add_argument("--seed-base", type=int, default=None,
                    help="phantom seed base instead of the held-out set (5 and 6 = the validation sets)")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--step", type=float, default=0.1, help="deletion/insertion step (fraction of patches)")
    ap.add_argument("--baseline", choices=("blur", "mean"), default="blur",
                    help="what deleted patches become: a Gaussian-blurred copy, or the image's mean colour")
    ap.add_argument("--blur", type=float, default=8.0, help="sigma (px) of the blurred baseline image")
    ap.add_argument("--score", choices=("cosine", "probability"), default="cosine",
                    help="deletion/insertion score: the explained cosine, or the target's probability among its rivals")
    ap.add_argument("--no-cost", action="store_true", help="skip the cost tables (faithfulness and localisation only)")
    ap.add_argument("--cost-objects", type=int, default=12, help="objects timed for the cost table")
    ap.add_argument("--repeats", type=int, default=7, help="timed repeats per method and object")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--vitb-objects", type=int, default=4, help="objects timed at ViT-B/16 size (0 = skip)")
    ap.add_argument("--vitb-repeats", type=int, default=3)
    ap.add_argument("--out", default=str(RESULTS / "explain"))
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    t_start = time.time()
    bundle = load_clip(a.model, device="cpu")
    fracs = np.round(np.arange(0, 1 + 1e-9, a.step), 6)
    if fracs[-1] < 1:
        fracs = np.append(fracs, 1.0)

    targets, rows, cost_items, cos_check, sh_gap = {}, [], [], [], []
    for fam in ("chest", "derm"):
        for j, (oid, img, text, mask, box) in enumerate(objects(fam, a.n_images, a.size, a.seed_base)):
            if text not in targets:
                targets[text] = resolve_target(bundle, text)
            tgt = targets[text]
            pv = bundle.pixel_values(img)
            base = (ndi.gaussian_filter(img, sigma=(a.blur, a.blur, 0)) if a.baseline == "blur"
                    else np.broadcast_to(img.mean((0, 1)), img.shape).astype(img.dtype))
            if a.score == "probability":
                for o in rivals(text):
                    targets.setdefault(o, resolve_target(bundle, o))
                emb_eval = torch.stack([tgt.embedding] + [targets[o].embedding for o in rivals(text)])
            else:
                emb_eval = tgt.embedding
            ends = scores(bundle, [img, base], emb_eval)
            base_pv = bundle.pixel_values(base)
            row = {"id": oid, "family": fam, "target": text, "mask_px": int(mask.sum()),
                   "box_share": float((box[2] - box[0]) * (box[3] - box[1]) / mask.size),
                   "cosine": float(ends[0]), "blur_cosine": float(ends[1]), "methods": {}}
            grid = None
            for meth in ALL:
                rng = np.random.default_rng([held_out_seed(0), len(rows), ALL.index(meth)])
                h, up, out = heatmap(bundle, meth, pv, img, tgt, rng, grid or (14, 14), base_pv)
                grid = h.shape
                if out is not None and out["cosine"] is not None and a.score == "cosine":
                    cos_check.append(abs(out["cosine"] - float(ends[0])))
                if out is not None and out["explained_cosine"] is not None:
                    sh_gap.append(abs(out["explained_cosine"] - out["cosine"]))
                row["methods"][meth] = (map_metrics(bundle, h, img, base, emb_eval, fracs, ends, mask, rng)
                                        | {"energy_in_box": energy_in_box(up, box)})
            cells = sum(hits(cell_box(c, grid, a.size), mask) for c in range(grid[0] * grid[1]))
            row["pointing_chance"] = cells / (grid[0] * grid[1])
            rows.append(row)
            if sum(c[2] == fam for c in cost_items) < -(-a.cost_objects // 2) and j % 3 == 0:
                cost_items.append((img, tgt.embedding, fam))
        print(f"{fam}: {sum(r['family'] == fam for r in rows)} objects, {time.time() - t_start:.0f}s", flush=True)
    t_faith = time.time() - t_start
    cost = None if a.no_cost else time_costs(bundle, cost_items, a.repeats, held_out_seed(1))
    cost_b16 = None
    if a.vitb_objects and not a.no_cost:
        vb = vit_b16_bundle()
        emb = torch.nn.functional.normalize(torch.randn(vb.model.config.projection_dim, generator=torch.Generator().manual_seed(0)), dim=0)
        cost_b16 = time_costs(vb, [(img, emb, fam) for img, _, fam in cost_items[:a.vitb_objects]], a.vitb_repeats,
                              held_out_seed(2), VITB_TIMED)

    # ---- aggregate
    rng = np.random.default_rng(0)
    metrics = ("deletion_auc", "insertion_auc", "pointing", "energy_in_box")
    groups = {"chest": [r for r in rows if r["family"] == "chest"], "derm": [r for r in rows if r["family"] == "derm"],
              "all": rows}

    def col(sel, meth, key):
        return np.array([float(r["methods"][meth][key]) for r in sel])

    summary = {g: {m: {k: float(col(sel, m, k).mean()) for k in metrics} | {
        "zero_maps": int(col(sel, m, "zero_map").sum())} for m in ALL} for g, sel in groups.items()}
    for g, sel in groups.items():
        summary[g]["_ref"] = {"n": len(sel), "pointing_chance": float(np.mean([r["pointing_chance"] for r in sel])),
                              "box_share": float(np.mean([r["box_share"] for r in sel])),
                              "cosine": float(np.mean([r["cosine"] for r in sel])),
                              "blur_cosine": float(np.mean([r["blur_cosine"] for r in sel]))}
    ci = {m: {k: boot_ci(col(rows, m, k), rng) for k in metrics} for m in ALL}
    better = {"deletion_auc": -1, "insertion_auc": 1, "pointing": 1, "energy_in_box": 1}
    paired = {}
    for ours in OURS:
        for other in ("gradcam", "attention", "random", "grad_eclip_single_head"):
            for k in metrics:
                diff = better[k] * (col(rows, ours, k) - col(rows, other, k))
                lo, hi = boot_ci(diff, rng)
                paired[f"{ours} vs {other}: {k}"] = {"mean_gain": float(diff.mean()), "ci95": [lo, hi],
                                                     "significant": bool(lo > 0), "worse": bool(hi < 0)}

    def beats(other, k, ours=OURS[:2]):
        return [o for o in ours if paired[f"{o} vs {other}: {k}"]["significant"]]

    # ---- tables
    n_chest, n_derm = len(groups["chest"]), len(groups["derm"])
    ref = summary["all"]["_ref"]
    base_txt = (f"a Gaussian-blurred copy (sigma {a.blur:g} px)" if a.baseline == "blur"
                else "the image's mean colour")
    split = "held-out" if a.seed_base is None else f"validation (seed base {a.seed_base})"
    lines = [header(f"Explanation heatmaps on {split} phantoms: faithfulness, localisation, cost"),
             f"- model: `{bundle.path}` (embedded default CLIP, ViT {grid[0]}x{grid[1]} patch grid at "
             f"{bundle.image_size} px), CPU, torch threads {a.threads}; every method explains the same model and target.",
             f"- objects: {a.n_images} {split} chest and {a.n_images} {split} derm phantoms at {a.size} px "
             f"(seeds {phantom_seed(0, a.seed_base):,}+, images without a finding skipped): {n_chest} chest findings "
             f"(target = finding name), {n_derm} derm objects (lesion, target = its diagnosis; present spatial "
             f"concepts {', '.join(DERM_SPATIAL)}, target = concept name); masks >= {MIN_PIXELS} px.",
             "- target embedding: `resolve_target(bundle, text)`, the mean of the zero-shot positive templates "
             "that `explain` explains; heatmaps from `explain(..., target_embedding=..., image=...)`, radius 5, "
             "entropy on the image. Random map: uniform noise on the patch grid.",
             f"- deletion / insertion: patches ranked by heat (ties random), the top {a.step:.0%}, "
             f"{2 * a.step:.0%}, ..., 100% replaced by {base_txt} / pasted onto "
             "it; score = " + ("cos(image, target) via `encode_images`" if a.score == "cosine" else
                              "p(target) = softmax(logit scale x cos) over the target and its rivals (the family's "
                              "other findings / diagnoses / concepts), via `encode_images`")
             + "; AUC over the patch fraction (trapezoid). "
             f"Mean score of the intact image {ref['cosine']:.3f}, of the baseline image {ref['blur_cosine']:.3f}.",
             "- pointing game: the heatmap's peak patch cell touches the object mask (an all-zero map counts as a "
             f"miss); chance for a uniformly random cell = {ref['pointing_chance']:.3f}. Energy-in-box: heat of "
             f"the upsampled map inside the object's box / total; a uniform map gives the box's area share "
             f"{ref['box_share']:.3f}.",
             "- sanity: |explain cosine - benchmark cosine of the intact image| "
             + (f"<= {max(cos_check):.1e}" if cos_check else "not checked (probability score)") + "; the "
             f"single-head baseline explains a pass whose cosine differs from the real one by {np.mean(sh_gap):.3f} "
             "on average.", "",
             f"## Faithfulness and localisation (all {len(rows)} objects; mean, 95% bootstrap CI)", "",
             "| method | deletion AUC (lower better) | insertion AUC (higher better) | pointing game | energy-in-box | all-zero maps |",
             "|---|---|---|---|---|---|"]
    s_all = summary["all"]
    for m in ALL:
        c = ci[m]
        lines.append(f"| {LABEL[m]} | " + " | ".join(
            f"{s_all[m][k]:.3f} [{c[k][0]:.3f}, {c[k][1]:.3f}]" for k in metrics) + f" | {s_all[m]['zero_maps']} |")
    lines += ["", "## Per family (means)", "",
              "| family | objects | method | deletion AUC | insertion AUC | pointing game | energy-in-box |",
              "|---|---|---|---|---|---|---|"]
    for g in ("chest", "derm"):
        for m in ALL:
            s = summary[g][m]
            lines.append(f"| {g} | {summary[g]['_ref']['n']} | {LABEL[m]} | {s['deletion_auc']:.3f} | "
                         f"{s['insertion_auc']:.3f} | {s['pointing']:.3f} | {s['energy_in_box']:.3f} |")
    lines += ["", "## Paired gains of ours over the baselines (all objects; positive = ours better; 95% bootstrap CI)", "",
              "| comparison | deletion AUC | insertion AUC | pointing game | energy-in-box |", "|---|---|---|---|---|"]
    for ours in OURS:
        for other in ("gradcam", "attention", "random", "grad_eclip_single_head"):
            cells = []
            for k in metrics:
                p = paired[f"{ours} vs {other}: {k}"]
                cells.append(f"{p['mean_gain']:+.3f} [{p['ci95'][0]:+.3f}, {p['ci95'][1]:+.3f}]")
            lines.append(f"| {LABEL[ours]} vs {LABEL[other]} | " + " | ".join(cells) + " |")
    if cost is not None:
        lines += cost_lines(a, cost, cost_b16, cost_items)
    # ---- targets
    keys = ("deletion_auc", "insertion_auc", "pointing")
    lines += ["", "## Targets", ""]
    for ours, what in ((OURS[:2], "on the last block (the paper's)"), (ALL_BLOCKS, "over all blocks (`blocks`)"),
                       (DIRECT, "over all blocks with the direct gradient (`gradient: direct`)")):
        parts = []
        for other in ("gradcam", "attention", "random"):
            got = {k: beats(other, k, ours) for k in keys}
            parts.append(f"vs {LABEL[other]}: " + ", ".join(
                f"{k.replace('_auc', '')} {'+'.join(v) if v else 'neither'}" for k, v in got.items()))
        ok = all(beats("gradcam", k, ours) for k in keys)
        lines.append(f"- \"MedGrad or Grad-ECLIP beats Grad-CAM on deletion, insertion and pointing game\", {what}: "
                     f"**{'met' if ok else 'missed'}** (significant paired wins, 95% CI above 0). All comparisons: "
                     + "; ".join(parts) + ".")
    if cost is not None:
        lines += cost_targets(cost, cost_b16)
    lines += ["", f"Run time: {time.time() - t_start:.0f}s ({t_faith:.0f}s faithfulness/localisation).", ""]
    mean_curves = {m: {k: np.mean([r["methods"][m][k] for r in rows], 0).tolist() for k in ("deletion", "insertion")}
                   for m in ALL}
    write_results(a.out, lines, {
        "args": vars(a), "fractions": fracs.tolist(), "summary": summary, "ci95": ci, "paired": paired,
        "cost": cost, "cost_vit_b16": cost_b16, "mean_curves": mean_curves,
        "sanity": {"max_cosine_gap": float(max(cos_check)) if cos_check else None,
                   "single_head_mean_cosine_gap": float(np.mean(sh_gap))},
        "objects": [{k: v for k, v in r.items() if k != "methods"} |
                    {"methods": {m: {k: v for k, v in d.items() if k not in ("deletion", "insertion")}
                                 for m, d in r["methods"].items()}} for r in rows]})


def cost_lines(a, cost, cost_b16, cost_items) -> list[str]:
    """The cost tables (default model, and ViT-B/16 size when measured)."""
    lines = ["", f"## Cost (median over {len(cost_items)} objects x {a.repeats} interleaved repeats, threads {a.threads})", "",
              "| method | ms per heatmap | ratio to a plain forward (no_grad) |",
              "|---|---|---|"]
    for k in ["forward"] + [k for k in COST_ROWS if k in cost]:
        c = cost[k]
        name = "plain forward `encode_images` (no_grad)" if k == "forward" else LABEL[k]
        lines.append(f"| {name} | {c['median_ms']:.1f} | {c['ratio_to_forward']:.2f}x |")
    lines.append("")
    lines.append("- heatmap = `explain(..., words=False)` with the target embedding given (text encoding not "
                 "timed); MedGrad includes the local-entropy map of the 224 px image (64 grey levels, radius 5), "
                 "which by default runs on a worker thread beside the forward and backward (scikit-image releases "
                 "the GIL): the same CPU work as the one-thread row, less waiting.")
    if cost_b16:
        lines += ["", f"### The same at ViT-B/16 size (random weights, 224 px, width 768, 12 layers; "
                      f"{a.vitb_objects} objects x {a.vitb_repeats} repeats)", "",
                  "| method | ms per heatmap | ratio to a plain forward (no_grad) |", "|---|---|---|"]
        for k in ["forward", *VITB_TIMED]:
            c = cost_b16[k]
            name = "plain forward `encode_images` (no_grad)" if k == "forward" else LABEL[k]
            lines.append(f"| {name} | {c['median_ms']:.1f} | {c['ratio_to_forward']:.2f}x |")
        lines += ["", "- the default model's forward (2M parameters) takes a few ms, so the fixed cost of the "
                  "entropy map weighs more there than at a clinical model size."]
    return lines


def cost_targets(cost, cost_b16) -> list[str]:
    """The two cost target lines."""
    cheap = [m for m in ("medgrad", "grad_eclip") if cost[m]["ratio_to_forward"] <= 1.5]
    ig_ratio = cost["integrated_gradients"]["median_ms"] / cost["medgrad"]["median_ms"]
    ig_ok = ig_ratio >= 20
    b16 = ""
    if cost_b16:
        b16_ig = cost_b16["integrated_gradients"]["median_ms"] / cost_b16["medgrad"]["median_ms"]
        b16 = (f"; at ViT-B/16 size MedGrad {cost_b16['medgrad']['ratio_to_forward']:.2f}x, Grad-ECLIP "
               f"{cost_b16['grad_eclip']['ratio_to_forward']:.2f}x a forward, IG {b16_ig:.1f}x MedGrad")
    verdict = ("met" if len(cheap) == 2 else "missed" if not cheap else
               f"met for {LABEL[cheap[0]]} only, missed for {LABEL[({'medgrad', 'grad_eclip'} - set(cheap)).pop()]}")
    return [f"- \"IntegratedGradients is >= 20x slower than ours\": **{'met' if ig_ok else 'missed'}** "
            f"(IG {cost['integrated_gradients']['median_ms']:.0f} ms = {ig_ratio:.1f}x MedGrad on the default model{b16}).",
              f"- \"A heatmap costs <= 1.5x a forward pass\": **{verdict}** "
              f"(MedGrad {cost['medgrad']['ratio_to_forward']:.2f}x"
              + (f" with its entropy on a second thread ({cost['medgrad_serial']['ratio_to_forward']:.2f}x "
                 "all in one thread)" if "medgrad_serial" in cost else "")
              + (f" and {cost['medgrad_cached']['ratio_to_forward']:.2f}x for another target of the same image"
                 if "medgrad_cached" in cost else "") + ", Grad-ECLIP "
              f"{cost['grad_eclip']['ratio_to_forward']:.2f}x a plain no_grad forward on the default model{b16})."
            ] + [f"- The same {what}: **{'met' if all(cost[m]['ratio_to_forward'] <= 1.5 for m in rows) else 'missed'}**"
                 f" (MedGrad {cost[rows[0]]['ratio_to_forward']:.2f}x, Grad-ECLIP "
                 f"{cost[rows[1]]['ratio_to_forward']:.2f}x a forward"
                 + (f"; at ViT-B/16 size MedGrad {cost_b16[rows[0]]['ratio_to_forward']:.2f}x"
                    if cost_b16 and rows[0] in cost_b16 else "")
                 + f"); IG is {cost['integrated_gradients']['median_ms'] / cost[rows[0]]['median_ms']:.1f}x MedGrad "
                 f"{what}." for rows, what in ((ALL_BLOCKS, "over all blocks"),
                                               (DIRECT, "over all blocks with the direct gradient"))
                 if rows[0] in cost]


if __name__ == "__main__":
    main()
