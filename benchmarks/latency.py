"""Click latency of the region model, side by side in one run (batch 1, CPU, fixed torch threads).

1. Model level, at the default model size and at ViT-B/16 scale (random weights, k=2): full forward
   (`RegionCLIP.forward`: trunk + fusion + decoder) vs a cached click (`forward_from_trunk`: prompt
   encoder + fusion + decoder), medians of N repeats after warmup, and the ratio.
2. Predictor level: `RegionPredictor.predict` on a 512 px chest, trunk miss vs hit (crop, resize, paste).
3. End to end: Slicer-shaped multipart POST /infer/region_seg to the real server (`clinlens.server.Server`
   over a `make_studies` folder, chest 512 px): p50/p95 over clicks at varied positions, trunk misses and
   follow-up clicks separately; zero-shot and chest `concepts` infer p50 for context.
4. Concept click: a CSR forward (`CSRModel`, chest concepts) at input 224, 448 and 672 px, the shipped
   size marked (benchmarks/results/concepts_backbone.md chose it), and the ratio to 224 px.
Writes benchmarks/results/latency.md and .json.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import requests
import torch
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from common import RESULTS, header, median_ms, vit_b16, write_results  # noqa: E402
from clinlens.server import read_multipart, slicer_post  # noqa: E402  (requests exactly as Slicer sends them)

from clinlens.data.image_io import load_image, to_unit_rgb  # noqa: E402
from clinlens.data.studies import make_studies  # noqa: E402
from clinlens.models.clip import load_clip  # noqa: E402
from clinlens.models.csr import CSRModel  # noqa: E402
from clinlens.models.region_clip import RegionCLIP  # noqa: E402
from clinlens.models.region_predictor import RegionPredictor  # noqa: E402
from clinlens.server import Server  # noqa: E402


def model_rows(model: RegionCLIP, pixels: torch.Tensor, n: int, warmup: int) -> dict:
    """Full forward vs cached click with the same prompt (1 fg + 1 bg click and a mask prompt)."""
    S = model.image_size
    pts = torch.tensor([[[S * 0.5, S * 0.5], [S * 0.8, S * 0.3]]])
    lab = torch.tensor([[1, 0]])
    mp = torch.zeros(1, 1, *model.prompt_encoder.mask_hw)
    mp[..., 20:36, 20:36] = 1
    with torch.inference_mode():
        hidden = model.trunk(pixels)
        full = median_ms(lambda: model(pixels, pts, lab, None, mp), n, warmup)
        cached = median_ms(lambda: model.forward_from_trunk(hidden, pts, lab, None, mp), n, warmup)
    params = sum(p.numel() for p in model.clip.vision_model.parameters()) / 1e6
    return {"full_ms": full, "cached_ms": cached, "ratio": cached / full, "vision_params_M": params}


def pct(xs, q) -> float:
    return float(np.percentile(xs, q)) if len(xs) else float("nan")


def csr_rows(bundle, sizes, n: int, warmup: int) -> dict:
    """Chest CSR forward (pixels -> class and concept scores) per input size, from one 512 px chest image."""
    from clinlens.data.phantoms import make_chest
    from clinlens.trainers.concepts import CSR_FAMILIES, SHIPPED

    img = to_unit_rgb(make_chest(70_000_001, size=512).image)
    shipped = SHIPPED.get("chest", {}).get("input_size", bundle.image_size)
    out = {}
    for s in sizes:
        m = CSRModel.from_bundle(bundle, *CSR_FAMILIES["chest"], input_size=s).eval()
        with torch.inference_mode():
            out[s] = {"ms": median_ms(lambda: m(bundle.pixel_values(img, m.image_size)), n, warmup),
                      "grid": list(m.grid), "shipped": s == shipped}
    for r in out.values():
        r["ratio"] = r["ms"] / out[sizes[0]]["ms"]
    return out


def http_rows(clip_dir, n_images: int, follow: int, n_zeroshot: int, threads: int, seed: int = 0) -> dict:
    """Real server on a fresh studies folder: region_seg clicks (misses vs follow-ups), zeroshot and concepts
    requests."""
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory() as tmp:
        studies = Path(tmp) / "studies"
        make_studies(studies, n_chest=n_images + 1, n_derm=0, n_ct=0, labelled_fraction=0.0, seed=seed,
                     chest_size=512, dicom=False, progress=False)
        conf = {"model_dir": Path(tmp) / "model", **({"clip_model": clip_dir} if clip_dir else {})}
        env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        with Server(studies, conf=conf, env=env, log_path=Path(tmp) / "server.log") as srv:
            ids = sorted(requests.get(srv.url + "/datastore/?output=all").json()["objects"])
            H, W = load_image(studies / f"{ids[0]}.png").array.shape[:2]
            click = lambda img, p: slicer_post(f"{srv.url}/infer/region_seg?image={img}", p)  # noqa: E731
            for warm in (click(ids[0], {"foreground": [[W // 2, H // 2, 0]], "background": [], "label": "w"}),
                         slicer_post(f"{srv.url}/infer/zeroshot?image={ids[0]}", {}),
                         slicer_post(f"{srv.url}/infer/concepts?image={ids[0]}", {})):  # loads the models
                warm.raise_for_status()
            rows = []  # (ms, server total_ms, cached)
            bar = tqdm(total=n_images * (1 + follow), desc="HTTP clicks")
            for img in ids[1:]:
                x0, y0 = rng.integers(int(0.15 * W), int(0.85 * W)), rng.integers(int(0.15 * H), int(0.85 * H))
                fg, bg = [[int(x0), int(y0), 0]], []
                for k in range(1 + follow):
                    if k:  # a follow-up click near the object: fg or bg, the full point list as Slicer sends it
                        x, y = np.clip(np.array([x0, y0]) + rng.integers(-30, 31, 2), 0, [W - 1, H - 1])
                        (fg if k % 2 else bg).append([int(x), int(y), 0])
                    t0 = time.perf_counter()
                    r = click(img, {"foreground": fg, "background": bg, "label": "bench"})
                    ms = 1e3 * (time.perf_counter() - t0)
                    r.raise_for_status()
                    res = json.loads(read_multipart(r)["params"].content)
                    rows.append((ms, res["latencies"]["total_ms"], bool(res["cached"])))
                    bar.update()
            bar.close()
            zs = []
            for i in tqdm(range(n_zeroshot), desc="HTTP zeroshot"):
                t0 = time.perf_counter()
                slicer_post(f"{srv.url}/infer/zeroshot?image={ids[1 + i % n_images]}", {}).raise_for_status()
                zs.append(1e3 * (time.perf_counter() - t0))
            cs = []
            for i in tqdm(range(n_zeroshot), desc="HTTP concepts"):
                t0 = time.perf_counter()
                slicer_post(f"{srv.url}/infer/concepts?image={ids[1 + i % n_images]}", {}).raise_for_status()
                cs.append(1e3 * (time.perf_counter() - t0))
    out = {}
    for name, sel in (("trunk miss", [r for r in rows if not r[2]]), ("follow-up (cached trunk)", [r for r in rows if r[2]]),
                      ("all clicks", rows)):
        out[name] = {"n": len(sel), "p50": pct([r[0] for r in sel], 50), "p95": pct([r[0] for r in sel], 95),
                     "server_p50": pct([r[1] for r in sel], 50)}
    for name, xs in (("zeroshot", zs), ("concepts", cs)):
        out[name] = {"n": len(xs), "p50": pct(xs, 50), "p95": pct(xs, 95), "server_p50": float("nan")}
    return out


def predictor_rows(pred: RegionPredictor, n: int, warmup: int) -> dict:
    """`RegionPredictor.predict` on a 512 px chest: a trunk miss (cache cleared) vs a follow-up hit."""
    from clinlens.data.phantoms import make_chest

    img = to_unit_rgb(make_chest(70_000_001, size=512).image)
    fg, bg = [[256, 200]], [[290, 230]]

    def miss():
        pred.clear()
        return pred.predict(img, "bench", fg, bg)

    prev = miss()["mask"]
    return {"miss_ms": median_ms(miss, n, warmup),
            "hit_ms": median_ms(lambda: pred.predict(img, "bench", fg, bg, mask_prompt=prev), n, warmup)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF CLIP dir with region.safetensors (default: the embedded default)")
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--images", type=int, default=6, help="chest images for the HTTP clicks")
    ap.add_argument("--follow", type=int, default=6, help="follow-up clicks per image")
    ap.add_argument("--zeroshot", type=int, default=12, help="zeroshot (and concepts) HTTP requests")
    ap.add_argument("--csr-sizes", type=int, nargs="+", default=[224, 448, 672], help="CSR input sizes to time")
    ap.add_argument("--skip-vitb", action="store_true")
    ap.add_argument("--out", default=str(RESULTS / "latency"))
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    bundle = load_clip(a.model, device="cpu")
    pred = RegionPredictor.from_bundle(bundle)
    px = bundle.pixel_values(to_unit_rgb(np.linspace(0, 1, 512 * 512, dtype=np.float32).reshape(512, 512)))
    models = {f"default ({bundle.image_size} px, patch {bundle.model.config.vision_config.patch_size}, "
              f"k={pred.model.k})": model_rows(pred.model, px, a.repeats, a.warmup)}
    if not a.skip_vitb:
        vb = vit_b16()
        models["ViT-B/16 (224 px, width 768, 12 layers, k=2)"] = model_rows(
            vb, torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0)), a.repeats, a.warmup)
    prow = predictor_rows(pred, a.repeats, a.warmup)
    csr = csr_rows(bundle, a.csr_sizes, a.repeats, a.warmup)
    http = http_rows(a.model, a.images, a.follow, a.zeroshot, a.threads)

    lines = [header("Click latency: full forward vs cached trunk, and HTTP click -> mask"),
             f"- CPU, batch 1, torch threads {a.threads} (server: OMP/MKL threads {a.threads}); medians of "
             f"{a.repeats} repeats after {a.warmup} warmup; all rows measured in this one run.",
             f"- default model: `{bundle.path}` with `{pred.model_path.name}`. Prompt in both rows: 1 fg + 1 bg "
             "click and a mask prompt (a follow-up click).", "",
             "| model | vision params (M) | full forward ms | cached click ms | cached / full |", "|---|---|---|---|---|"]
    for name, r in models.items():
        lines.append(f"| {name} | {r['vision_params_M']:.1f} | {r['full_ms']:.1f} | {r['cached_ms']:.1f} | "
                     f"{r['ratio']:.3f} |")
    vb_ratio = next((r["ratio"] for n, r in models.items() if n.startswith("ViT-B")), float("nan"))
    lines += ["", f"Target cached <= 0.25x full at ViT-B/16: {vb_ratio:.3f} -> "
              f"**{'met' if vb_ratio <= 0.25 else 'missed'}**.", "",
              f"`RegionPredictor.predict` on a 512 px chest (crop, resize, model, paste): trunk miss "
              f"{prow['miss_ms']:.1f} ms, follow-up hit {prow['hit_ms']:.1f} ms.", "",
              "## End to end over HTTP (real server)", "",
              f"Slicer-shaped multipart POST `/infer/region_seg` on 512x512 chest phantoms ({a.images} images, "
              f"after one warmup request that loads the models): per image a first click at a random position "
              f"(15-85% of each side), then {a.follow} follow-up clicks within 30 px of it (alternately fg and bg, "
              "all points sent each time, same label so the previous mask is the mask prompt). Rows split by the "
              "server's own `cached` flag. Round trip = client time for the request (multipart answer with the "
              "PNG label); server = the predictor's `total_ms`.", "",
              "| request | n | p50 ms | p95 ms | server p50 ms |", "|---|---|---|---|---|"]
    for name, r in http.items():
        label = f"{name} (context)" if name in ("zeroshot", "concepts") else "region_seg: " + name
        lines.append(f"| {label} | {r['n']} | "
                     f"{r['p50']:.1f} | {r['p95']:.1f} | {r['server_p50']:.1f} |")
    p50 = http["all clicks"]["p50"]
    lines += ["", f"Target HTTP click p50 <= 100 ms: {p50:.1f} ms -> **{'met' if p50 <= 100 else 'missed'}**.", "",
              "## Concept click: CSR forward per input size", "",
              f"`CSRModel` on the chest concepts ({a.repeats} repeats after {a.warmup} warmup, same torch threads): "
              "pixels of a 512 px chest resized to the model input, CLIP patch features (position embeddings "
              "interpolated above 224 px), concept head, prototypes, scores. Weights do not change the cost, so "
              "untrained heads are timed; the shipped chest size is marked. The `concepts` HTTP row above is the "
              "shipped model end to end.", "",
              "| input px | patch grid | forward ms | × 224 px |", "|---|---|---|---|"]
    for s, r in csr.items():
        lines.append(f"| {s}{' (shipped)' if r['shipped'] else ''} | {r['grid'][0]}x{r['grid'][1]} | {r['ms']:.1f} | "
                     f"{r['ratio']:.2f} |")
    lines.append("")
    write_results(a.out, lines, {"models": models, "predictor": prow, "http": http,
                                 "csr": {str(k): v for k, v in csr.items()}})


if __name__ == "__main__":
    main()
