"""Batch throughput (series per minute) of `clinlens batch`, local process pool vs Ray actors, at 1 and
2 workers, measured side by side in one run on the same generated series.

- Data: `--series` CT phantom series of 512 x 512 x `--slices` (a `make_ct` volume at 128 x 128
  in-plane, resized x4 with linear interpolation, spacing scaled to match), written with
  `write_ct_series` into a temp folder.
- Work per series: all three tasks (segmentation with `--prompt`, CSR classification, one MedGrad
  heatmap), outputs written and checked, exactly as `clinlens batch` runs them; 1 torch thread per
  worker.
- Each configuration runs on a fresh output folder. Throughput is series / (last finish - first
  start) over the per-series wall-clock stamps, so worker start-up and model loading (reported
  separately as "start-up") are not counted; end-to-end series/min (start-up included) is shown too.
- Rounds: the four configurations run in order, then in reverse order, and so on; the table gives the
  mean over rounds. Scaling efficiency = throughput(2 workers) / (2 x throughput(1 worker)).
- The load average before and after, the CPU seconds per series and the cores the workers actually
  obtained are recorded: on a shared machine other processes take cores, and wall-clock scaling then
  measures the machine, not the executor.
Writes benchmarks/results/batch_throughput.md and .json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from common import RESULTS, header  # noqa: E402


def make_series(folder: Path, n: int, slices: int, seed: int = 0) -> list[str]:
    from scipy import ndimage as ndi

    from clinlens.data.dicom_io import write_ct_series
    from clinlens.data.phantoms import make_ct

    uids = []
    for i in range(n):
        s = make_ct(seed + i, shape=(slices, 128, 128))
        vol = ndi.zoom(s.image.astype(np.float32), (1, 4, 4), order=1)
        sp = (s.spacing[0] / 4, s.spacing[1] / 4, s.spacing[2])
        uid = f"1.2.826.0.1.3680043.8.498.7777.{seed}.{i + 1}"
        write_ct_series(vol, folder / f"series_{i:02d}", spacing=sp, series_uid=uid,
                        study_uid=f"1.2.826.0.1.3680043.8.498.7777.{seed}", series_number=i + 1)
        uids.append(uid)
    return uids


def run_config(src: Path, out: Path, executor: str, workers: int, prompt: str) -> dict:
    from clinlens.batch.process import BatchConfig
    from clinlens.batch.run import run_batch

    cfg = BatchConfig(out_dir=str(out), prompts=(prompt,), threads=1)
    t0 = time.time()
    res = run_batch(src, out, cfg, executor=executor, workers=workers, threads=1, progress=False)
    t1 = time.time()
    ok = res.by_status("ok")
    if len(ok) != len(res.rows) or res.exit_code:
        raise RuntimeError(f"{executor}x{workers}: {res.counts} {[e.reason for e in res.errors][:3]}")
    first, last = min(r["started"] for r in ok), max(r["finished"] for r in ok)
    cpu = sum(r["cpu_seconds"] for r in ok)
    return {"executor": executor, "workers": workers, "series": len(ok),
            "steady_series_per_min": 60 * len(ok) / (last - first),
            "cpu_s_per_series": cpu / len(ok), "cores_obtained": cpu / (last - first),
            "end_to_end_series_per_min": 60 * len(ok) / (t1 - t0),
            "startup_s": first - t0, "mean_series_s": float(np.mean([r["seconds"] for r in ok])),
            "workers_used": len({r["pid"] for r in ok}),
            "model_loads_per_worker": sorted({r["model_loads"] for r in ok})}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--series", type=int, default=6)
    ap.add_argument("--slices", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--prompt", default="lung nodule")
    ap.add_argument("--ray-cpus", type=int, default=2)
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import ray
    import torch

    torch.set_num_threads(1)
    configs = [("local", 1), ("local", 2), ("ray", 1), ("ray", 2)]
    load_before = os.getloadavg()
    runs = []
    with tempfile.TemporaryDirectory(prefix="clinlens_batch_bench_") as tmp:
        tmp = Path(tmp)
        src = tmp / "in"
        make_series(src, a.series, a.slices)
        ray.init(num_cpus=a.ray_cpus, include_dashboard=False, log_to_driver=False)
        try:
            for r in range(a.rounds):
                order = configs if r % 2 == 0 else configs[::-1]
                for ex, w in order:
                    res = run_config(src, tmp / f"out_{r}_{ex}_{w}", ex, w, a.prompt)
                    res["round"] = r
                    runs.append(res)
                    print(f"round {r} {ex} x{w}: {res['steady_series_per_min']:.2f} series/min steady, "
                          f"{res['end_to_end_series_per_min']:.2f} end to end, start-up {res['startup_s']:.1f} s, "
                          f"load {os.getloadavg()[0]:.1f}", flush=True)
        finally:
            ray.shutdown()
    load_after = os.getloadavg()

    def mean(ex, w, key):
        return float(np.mean([x[key] for x in runs if x["executor"] == ex and x["workers"] == w]))

    table = []
    for ex, w in configs:
        table.append({"executor": ex, "workers": w, **{k: mean(ex, w, k) for k in
                      ("steady_series_per_min", "end_to_end_series_per_min", "startup_s", "mean_series_s",
                       "cpu_s_per_series", "cores_obtained")}})
    eff = {ex: mean(ex, 2, "steady_series_per_min") / (2 * mean(ex, 1, "steady_series_per_min"))
           for ex in ("local", "ray")}
    eff_e2e = {ex: mean(ex, 2, "end_to_end_series_per_min") / (2 * mean(ex, 1, "end_to_end_series_per_min"))
               for ex in ("local", "ray")}
    # work inflation: does a series cost more CPU when two run at once? 1.0 = none (scales with free cores)
    eff_cpu = {ex: mean(ex, 1, "cpu_s_per_series") / mean(ex, 2, "cpu_s_per_series") for ex in ("local", "ray")}
    ray_vs_local = {w: mean("ray", w, "steady_series_per_min") / mean("local", w, "steady_series_per_min")
                    for w in (1, 2)}
    out = {"series": a.series, "shape_zyx": [a.slices, 512, 512], "rounds": a.rounds, "prompt": a.prompt,
           "tasks": ["segment", "classify", "explain"], "cpu_count": os.cpu_count(),
           "load_average_before": load_before, "load_average_after": load_after,
           "table": table, "scaling_efficiency_steady": eff, "scaling_efficiency_end_to_end": eff_e2e,
           "cpu_efficiency": eff_cpu,
           "ray_over_local_steady": ray_vs_local, "runs": runs, "target_efficiency": 0.8}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "batch_throughput.json").write_text(json.dumps(out, indent=1))
    lines = [header("clinlens batch throughput: local pool vs Ray, 1 vs 2 workers"), "",
             f"{a.series} CT phantom series of {a.slices} x 512 x 512, all tasks (segment '{a.prompt}', classify, "
             f"explain), 1 torch thread per worker, {a.rounds} round(s) alternating the order; means over rounds.",
             f"Load average (1/5/15 min) before {tuple(round(x, 2) for x in load_before)}, after "
             f"{tuple(round(x, 2) for x in load_after)} on {os.cpu_count()} cores: other processes share them.", "",
             "| executor | workers | steady series/min | end-to-end series/min | start-up s | wall s per series "
             "| CPU s per series | cores obtained |",
             "|---|---|---|---|---|---|---|---|"]
    for t in table:
        lines.append(f"| {t['executor']} | {t['workers']} | {t['steady_series_per_min']:.2f} | "
                     f"{t['end_to_end_series_per_min']:.2f} | {t['startup_s']:.1f} | {t['mean_series_s']:.2f} | "
                     f"{t['cpu_s_per_series']:.2f} | {t['cores_obtained']:.2f} |")
    lines += ["", "| executor | scaling efficiency, steady (2w / 2x1w) | end to end | CPU efficiency (CPU s/series "
              "1w / 2w) | target |", "|---|---|---|---|---|"]
    for ex in ("local", "ray"):
        lines.append(f"| {ex} | {eff[ex]:.2f} | {eff_e2e[ex]:.2f} | {eff_cpu[ex]:.2f} | >= 0.8 |")
    lines += ["", f"Ray / local throughput (steady): 1 worker {ray_vs_local[1]:.2f}, 2 workers {ray_vs_local[2]:.2f}.",
              "", "Steady = series / (last finish - first start), from the per-series wall-clock stamps: worker "
              "start-up and model loading are excluded there and included in end to end. Cores obtained = the "
              "workers' CPU seconds / that wall time: below the worker count when other processes hold the cores. "
              "CPU efficiency = CPU seconds per series with 1 worker / with 2: 1.0 means running two adds no work, "
              "so wall-clock scaling is bounded only by the cores the machine gives."]
    (RESULTS / "batch_throughput.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
