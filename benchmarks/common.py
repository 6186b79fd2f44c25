"""Shared benchmark plumbing: the header every results table carries (machine, date, command), and writing
the table (.md) with its data (.json)."""
from __future__ import annotations

import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.node() or 'host'}: {platform.machine()}, {os.cpu_count()} CPU cores, {gpu}, torch {torch.__version__}"


def header(title: str) -> str:
    cmd = " ".join(["python"] + [Path(sys.argv[0]).as_posix()] + sys.argv[1:])
    return (f"# {title}\n\n- machine: {machine()}\n- date: {datetime.datetime.now().isoformat(timespec='seconds')}\n"
            f"- command: `{cmd}`\n")


def write_results(out, lines: list[str], data) -> Path:
    """Write `lines` to OUT.md and `data` to OUT.json (creating the folder), and print the table."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(lines))
    out.with_suffix(".json").write_text(json.dumps(data, indent=1))
    print("\n".join(lines))
    return out


def median_ms(fn, n: int, warmup: int) -> float:
    """Median wall time of `fn()` in ms over `n` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(ts))


def vit_b16():
    """A RegionCLIP (k=2) with a ViT-B/16 vision tower (224 px, patch 16, width 768, 12 layers, 12 heads), random weights, small text tower."""
    from transformers import CLIPModel

    from clinlens.models.clip import small_clip_config
    from clinlens.models.region_clip import RegionCLIP

    torch.manual_seed(0)
    cfg = small_clip_config(1000, 0, 1, 2, vision=dict(image_size=224, patch_size=16, hidden_size=768,
                                                       intermediate_size=3072, num_hidden_layers=12,
                                                       num_attention_heads=12))
    return RegionCLIP(CLIPModel(cfg).eval(), k=2).eval()
