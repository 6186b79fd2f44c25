"""Shared benchmark plumbing: the header every results table carries (machine, date, command), and writing
the table (.md) with its data (.json)."""
from __future__ import annotations

import datetime
import json
import os
import platform
import sys
from pathlib import Path

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
