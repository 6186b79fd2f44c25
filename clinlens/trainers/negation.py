"""Negation fine-tuning of a CLIP's text tower on phantom images: CON2 (CoN-CLIP loss) or CON1.

methods.md §5; the losses and the batch builder are in `clinlens.models.negation_tuning`.
The image encoder is frozen, so the image embeddings of the training phantoms are computed once
(no grad) and only the text transformer, the text projection and, optionally, the logit scale
train. Training phantoms use seeds from `TRAIN_SEED_BASE`, disjoint from the benchmarks' held-out
seeds (`HELD_OUT = 50_000_000` and up). Deterministic for a seed on CPU (same thread count); CUDA
with bf16 autocast when present. The result is a complete HF CLIP directory (the base directory's
config and tokenizer, the tuned weights, `negation.json`), published atomically.
"""
from __future__ import annotations

import json
import math
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from clinlens.models.negation_tuning import NegationBatcher, con_clip_loss, contrastive_loss

LOSSES = ("con2", "con1")
TRAIN_SEED_BASE = 20_000_000          # + seed * 200_000 + family offset + index; stays below 50_000_000
FAMILY_OFFSET = {"chest": 0, "derm": 60_000, "ct": 120_000}
# Recipe (benchmarks/negation.py): lr 3e-4 for 300 steps moves the loss to its plateau in about a minute
# on one CPU thread; a longer run, a trained logit scale or a fixed training temperature of 50-100
# changed no retrieval figure beyond the benchmark's noise.
DEFAULTS = dict(loss="con2", steps=300, batch=64, lr=3e-4, n_images=1200, seed=0, mixed_p=0.3,
                train_scale=False, scale_lr=0.05, loss_scale=None, multi_positive=False,
                families=("chest", "derm"), weight_decay=0.0)


def train_seeds(family: str, seed: int, n: int) -> range:
    """Phantom seeds of the training images of one family."""
    if not 0 <= seed < 140 or n > 60_000:
        raise ValueError(f"seed must be in [0, 140) and n <= 60000 (held-out seeds start at 50_000_000); got {seed}, {n}")
    start = TRAIN_SEED_BASE + seed * 200_000 + FAMILY_OFFSET[family]
    return range(start, start + n)


def split_seeds(families, n_images: int, seed: int) -> dict[str, range]:
    """`n_images` training phantoms split evenly over `families`: family -> seeds."""
    per = [n_images // len(families) + (k < n_images % len(families)) for k in range(len(families))]
    return {fam: train_seeds(fam, seed, n) for fam, n in zip(families, per)}


def phantom_presence(families, n_images: int, seed: int, size: int, progress: bool = True):
    """(uint8 images [N, S, S, 3], presence dicts) of `n_images` training phantoms split over `families`."""
    from tqdm.auto import tqdm

    from clinlens.data.pairs import PairSet, add_phantom

    bad = set(families) - set(FAMILY_OFFSET)
    if bad or not families:
        raise ValueError(f"unknown families {sorted(bad)}; choose from {sorted(FAMILY_OFFSET)}")
    rng = np.random.default_rng(seed)
    ps = PairSet()
    jobs = [(fam, s) for fam, seeds in split_seeds(families, n_images, seed).items() for s in seeds]
    for fam, s in tqdm(jobs, desc="negation phantoms", disable=not progress, mininterval=2):
        add_phantom(ps, fam, s, size, rng, crops=0, ct_slices=2)
    return ps.array(), [dict(p) for p in ps.labels]


@torch.no_grad()
def image_embeddings(bundle, images: np.ndarray, bs: int = 64, progress: bool = True) -> torch.Tensor:
    """Frozen image embeddings (N, D), float32, on the bundle's device."""
    from tqdm.auto import tqdm

    out = []
    for i in tqdm(range(0, len(images), bs), desc="image embeddings", disable=not progress, mininterval=2):
        out.append(bundle.encode_images(bundle.pixel_values(images[i:i + bs].astype(np.float32) / 255)).float())
    return torch.cat(out)


def _hf_files(src: Path) -> list[Path]:
    """Files of an HF CLIP dir to carry over: everything but weights (`*.safetensors`, `*.bin`) and the
    JSON sidecars of clinlens checkpoints (region, CSR, prompt learner) trained on the old weights."""
    skip = {p.with_suffix(".json").name for p in src.glob("*.safetensors")} | {"negation.json"}
    return [p for p in sorted(src.iterdir()) if p.is_file() and p.suffix not in (".safetensors", ".bin")
            and p.name not in skip]


def train_negation(clip_dir, out_dir, loss: str = DEFAULTS["loss"], steps: int = DEFAULTS["steps"],
                   batch: int = DEFAULTS["batch"], lr: float = DEFAULTS["lr"], n_images: int = DEFAULTS["n_images"],
                   seed: int = DEFAULTS["seed"], device: str | None = None, progress: bool = True, log=print,
                   mixed_p: float = DEFAULTS["mixed_p"], train_scale: bool = DEFAULTS["train_scale"],
                   scale_lr: float = DEFAULTS["scale_lr"], loss_scale: float | None = DEFAULTS["loss_scale"],
                   multi_positive: bool = DEFAULTS["multi_positive"],
                   families=DEFAULTS["families"], weight_decay: float = DEFAULTS["weight_decay"],
                   data=None) -> dict:
    """Fine-tune the text tower of the CLIP at `clip_dir` with `loss` ("con2" | "con1"); publish to `out_dir`.

    `data` = (uint8 images [N, S, S, 3], presence dicts) replaces the generated phantoms (used by the
    benchmark to give CON1 and CON2 the same images without generating them twice). `mixed_p`: share
    of "f1, but no f2" captions; `train_scale` trains the logit scale (at `scale_lr`); `loss_scale`
    fixes the loss temperature instead of the model's logit scale (which stays as it is);
    `multi_positive` counts every in-batch text true of an image as a target (not the paper's loss).
    Returns the summary that is also written to `out_dir/negation.json`.
    """
    from tqdm.auto import tqdm

    from clinlens.models.clip import default_device, load_clip
    from clinlens.trainers.default_clip import publish_dir

    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; choose from {list(LOSSES)}")
    steps, batch, n_images = int(steps), int(batch), int(n_images)
    if steps < 1 or batch < 2 or n_images < 4:
        raise ValueError(f"need steps >= 1, batch >= 2, n_images >= 4; got {steps}, {batch}, {n_images}")
    t0 = time.time()
    clip_dir, out_dir = Path(clip_dir), Path(out_dir)
    torch.manual_seed(seed)
    dev = torch.device(device) if device else default_device()
    bundle = load_clip(clip_dir, device=dev)
    model = bundle.model
    if data is None:
        images, presence = phantom_presence(tuple(families), n_images, seed, bundle.image_size, progress)
    else:
        images, presence = data
    emb = image_embeddings(bundle, images, progress=progress)
    batcher = NegationBatcher(presence, mixed_p=mixed_p, seed=seed)
    log(f"{len(images)} images ({len(batcher.anchors)} with a finding) embedded in {time.time() - t0:.0f}s")

    model.requires_grad_(False)
    train = [model.text_model, model.text_projection]
    for m in train:
        m.requires_grad_(True)
    params = [p for m in train for p in m.parameters()]
    groups = [{"params": list(params)}]
    if train_scale:
        model.logit_scale.requires_grad_(True)
        params.append(model.logit_scale)
        groups.append({"params": [model.logit_scale], "lr": scale_lr, "weight_decay": 0.0})
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    amp = dev.type == "cuda"
    model.eval()
    model.text_model.train()
    losses = []
    bar = tqdm(range(steps), desc=f"negation {loss}", disable=not progress, mininterval=5)
    for step in bar:
        b = batcher.sample(batch)
        x, d = emb[torch.from_numpy(b.images).to(dev)], emb[torch.from_numpy(b.distractors).to(dev)]
        texts = b.captions + (b.negated if loss == "con2" else b.distractor_captions)
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=amp):
            t = bundle.encode_texts(texts, cache=False).float()
            scale = model.logit_scale.exp().clamp(max=100) if loss_scale is None else float(loss_scale)
            n = len(b.captions)
            pos = None
            if multi_positive:
                pos = b.truth(presence, loss)
                pos = tuple(m.to(dev) for m in pos) if loss == "con2" else pos.to(dev)
            if loss == "con2":
                value = con_clip_loss(x, d, t[:n], t[n:], scale, positives=pos)
            else:
                value = contrastive_loss(torch.cat([x, d]), t, scale, positives=pos)
        opt.zero_grad(set_to_none=True)
        value.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(value.item())
        if step % 20 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
    model.requires_grad_(False)
    model.eval().cpu()
    bundle._text_cache.clear()

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}_", dir=out_dir.parent))
    copied = []
    for f in _hf_files(clip_dir):
        shutil.copy2(f, tmp / f.name)
        copied.append(f.name)
    model.save_pretrained(str(tmp))  # config.json + model.safetensors
    fams = sorted({",".join(sorted(p)) for p in presence})
    summary = {
        "loss": loss, "base": str(clip_dir), "steps": steps, "batch": batch, "lr": lr, "weight_decay": weight_decay,
        "n_images": len(images), "anchors": int(len(batcher.anchors)), "families": list(families) if data is None else fams,
        "seed": seed, "train_seeds": ({f: [r.start, r.stop] for f, r in split_seeds(families, n_images, seed).items()}
                                      if data is None else "given by the caller"),
        "mixed_p": mixed_p, "train_scale": train_scale, "scale_lr": scale_lr if train_scale else None,
        "loss_scale": loss_scale, "multi_positive": multi_positive, "logit_scale": float(model.logit_scale.exp()),
        "trainable_params": sum(p.numel() for p in params), "frozen": "vision_model, visual_projection",
        "first_loss": float(np.mean(losses[:20])), "final_loss": float(np.mean(losses[-20:])),
        "device": str(dev), "torch_threads": torch.get_num_threads(), "seconds": round(time.time() - t0, 1),
        "machine": f"{platform.machine()} {os.cpu_count()} cpu", "copied_from_base": copied,
    }
    (tmp / "negation.json").write_text(json.dumps(summary, indent=2))
    tmp.chmod(0o755)
    for f in tmp.iterdir():
        f.chmod(0o644)
    publish_dir(tmp, out_dir)
    log(f"published {out_dir} ({loss}, loss {summary['first_loss']:.3f} -> {summary['final_loss']:.3f}, "
        f"{summary['seconds']}s)")
    return summary
