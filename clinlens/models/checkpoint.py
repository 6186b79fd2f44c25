"""One checkpoint format for clinlens's trainable parts (region model, CSR, prompt learner):
a safetensors file whose metadata carries `format`, `config` and the CLIP fingerprint, and a JSON
summary beside it; both published atomically (write to a temp file, then rename), so inference
that hot-reloads never reads half a file."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def atomic_write(path, write) -> None:
    """`write(tmp_path)` then rename onto `path` (same folder, so the rename is atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def publish(path, state: dict, meta: dict, info: dict) -> Path:
    """Write `info` as `<path>.json`, then `state` (name -> tensor) with string `meta` as `path`."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    atomic_write(path.with_suffix(".json"), lambda t: Path(t).write_text(json.dumps(info, indent=2)))
    atomic_write(path, lambda t: save_file(tensors, t, metadata=meta))
    return path


def summary(path) -> dict:
    """The JSON summary published beside the checkpoint at `path` ({} when there is none)."""
    meta = Path(path).with_suffix(".json")
    return json.loads(meta.read_text()) if meta.is_file() else {}


def read(path, fmt: str, what: str, hint: str) -> tuple[dict, dict]:
    """(metadata, tensors) of a checkpoint of format `fmt`; clear errors for a missing or foreign file."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {what} at {path}; {hint}")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != fmt:
        raise ValueError(f"{path} is not a clinlens {what} (format {meta.get('format')!r})")
    return meta, load_file(str(path))
