"""CUDA against CPU, side by side in one run on a GPU machine: click latency, heatmaps, training steps.

1. Click latency of the region model at the default size and at ViT-B/16 size (random weights): the full
   forward (trunk + fusion + decoder) and a cached click, batch 1, fp32 (what the server runs).
2. A MedGrad heatmap on the default model (`explain`, last block and all blocks), image entropy included.
3. Training step time (bf16 autocast on CUDA, fp32 on CPU) of the default-CLIP trainer and of the region
   trainer: two runs of each, N1 and N2 steps, (t2 - t1) / (N2 - N1), so set-up time cancels.
CPU rows use every core (`torch.get_num_threads()`). Writes benchmarks/results/gpu.md and .json.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from common import RESULTS, header, median_ms, vit_b16, write_results  # noqa: E402

from clinlens.explain.grad_eclip import explain  # noqa: E402
from clinlens.models.clip import load_clip  # noqa: E402
from clinlens.models.region_clip import RegionCLIP  # noqa: E402


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def click_rows(model: RegionCLIP, dev, n: int, warmup: int) -> dict:
    model.clip.to(dev)  # the frozen CLIP is not a submodule of RegionCLIP
    model = model.to(dev).eval()
    S = model.image_size
    x = torch.randn(1, 3, S, S, device=dev)
    pts = torch.tensor([[[S * 0.5, S * 0.5], [S * 0.8, S * 0.3]]], device=dev)
    lab = torch.tensor([[1, 0]], device=dev)

    def full():
        model(x, pts, lab)
        _sync(dev)

    with torch.inference_mode():
        hidden = model.trunk(x)

        def cached():
            model.forward_from_trunk(hidden, pts, lab)
            _sync(dev)

        return {"full_ms": median_ms(full, n, warmup), "cached_ms": median_ms(cached, n, warmup)}


def explain_rows(bundle, dev, n: int, warmup: int) -> dict:
    from clinlens.data.phantoms import make_derm

    img = make_derm(70_000_003, size=224).image
    out = {}
    for blocks in (1, len(bundle.model.vision_model.encoder.layers)):
        def one():
            explain(bundle, image=img, target_text="melanoma", method="medgrad", blocks=blocks, words=False)
            _sync(dev)
        out[f"blocks={blocks}"] = median_ms(one, n, warmup)
    return out


def step_time(train, n1: int, n2: int) -> float:
    """Seconds per training step: (t(n2) - t(n1)) / (n2 - n1)."""
    ts = []
    for n in (n1, n2):
        t0 = time.perf_counter()
        train(n)
        ts.append(time.perf_counter() - t0)
    return (ts[1] - ts[0]) / (n2 - n1)


def train_rows(dev, n1: int, n2: int, tmp: Path) -> dict:
    from clinlens.trainers.default_clip import train_default
    from clinlens.trainers.region_seg import phantom_region_examples, train_region

    counts = {"chest": 64, "derm": 64, "ct": 8}
    quiet = dict(progress=False, log=lambda *_: None)
    out = {"default CLIP step (batch 64)": step_time(
        lambda n: train_default(tmp / f"clip_{dev.type}", seed=0, steps=n, batch=64, counts=counts, device=str(dev), **quiet),
        n1, n2)}
    bundle = load_clip(tmp / f"clip_{dev.type}", device=dev)
    objects = list(phantom_region_examples(seed=0, n=32, propagation=False))
    out["region step (batch 8)"] = step_time(
        lambda n: train_region(bundle, objects, tmp / f"region_{dev.type}.safetensors", steps=n, batch=8, seed=0,
                               **quiet), n1, n2)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--steps", type=int, nargs=2, default=(10, 40), metavar=("N1", "N2"))
    ap.add_argument("--out", default=str(RESULTS / "gpu"))
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("benchmarks/gpu.py compares CUDA with CPU: run it on a machine with a CUDA device")
    devs = [torch.device("cpu"), torch.device("cuda")]
    res = {d.type: {} for d in devs}
    with tempfile.TemporaryDirectory() as tmp:
        for dev in devs:
            r = res[dev.type]
            default = load_clip(None, device=dev)
            r["click default"] = click_rows(RegionCLIP(default.model, k=2), dev, a.repeats, a.warmup)
            r["click ViT-B/16"] = click_rows(vit_b16(), dev, a.repeats, a.warmup)
            r["explain"] = explain_rows(default, dev, a.repeats, a.warmup)
            r["train"] = train_rows(dev, *a.steps, Path(tmp))
            print(dev, r, flush=True)
    cpu, gpu = res["cpu"], res["cuda"]
    lines = [header("CUDA against CPU, side by side"), "",
             f"- CPU rows: {torch.get_num_threads()} torch threads; CUDA rows: {torch.cuda.get_device_name(0)}.",
             f"- Latencies: medians of {a.repeats} after {a.warmup} warm-ups, batch 1. Training: seconds per step from "
             f"runs of {a.steps[0]} and {a.steps[1]} steps (set-up cancels).", "",
             "| what | CPU | CUDA | CPU / CUDA |", "|---|---|---|---|"]
    for size in ("default", "ViT-B/16"):
        for k, name in (("full_ms", "full forward"), ("cached_ms", "cached click")):
            c, g = cpu[f"click {size}"][k], gpu[f"click {size}"][k]
            lines.append(f"| click, {size} model: {name} (ms) | {c:.1f} | {g:.1f} | {c / g:.1f}x |")
    for k in cpu["explain"]:
        c, g = cpu["explain"][k], gpu["explain"][k]
        lines.append(f"| MedGrad heatmap, default model, {k} (ms) | {c:.1f} | {g:.1f} | {c / g:.1f}x |")
    for k in cpu["train"]:
        c, g = cpu["train"][k], gpu["train"][k]
        lines.append(f"| {k} (ms) | {1e3 * c:.0f} | {1e3 * g:.1f} | {c / g:.1f}x |")
    write_results(a.out, lines, res)


if __name__ == "__main__":
    main()
