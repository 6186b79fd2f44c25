"""`clinlens train-default`: train the embedded default CLIP on phantom image–text pairs.

Symmetric CLIP InfoNCE (Radford et al. 2021) with multi-positive targets: captions that are the
same string are all positives, so "no pleural effusion." on two images is not a false negative.
Deterministic for a seed on CPU (same thread count); CUDA with bf16 autocast when present.
The result is an HF `CLIPModel` directory with its tokenizer, published atomically.
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
import torch.nn.functional as F

from clinlens.data.pairs import NEGATION_TEMPLATES, REGION_TEMPLATES, build_pairs
from clinlens.models.clip import DEFAULT_CLIP_DIR, default_device, small_clip_config
from clinlens.models.zeroshot import NEGATIVE_TEMPLATES, POSITIVE_TEMPLATES
from clinlens.text.tokenizer import EOT, PAD, SOT, build_tokenizer

DEFAULTS = dict(seed=0, steps=800, batch=96, lr=5e-4, counts={"chest": 1400, "derm": 900, "ct": 80}, size=224)


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Mild intensity jitter (B, 3, S, S) in [0, 1]: contrast, brightness, gamma, noise. No flips (laterality)."""
    b, dev = x.shape[0], g.device  # drawn where `g` lives (x's device), so a GPU run augments on the GPU
    r = lambda lo, hi: lo + (hi - lo) * torch.rand(b, 1, 1, 1, generator=g, device=dev)  # noqa: E731
    x = (x - 0.5) * r(0.8, 1.25) + 0.5 + r(-0.08, 0.08)
    x = x.clamp(0, 1) ** r(0.8, 1.25)
    return (x + 0.02 * torch.randn(x.shape, generator=g, device=dev)).clamp(0, 1)


def publish_dir(src: Path, dst: Path) -> None:
    """Replace directory `dst` with `src` by renames, so a reader never sees a half-written model."""
    dst = Path(dst)
    old = dst.with_name(dst.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if dst.exists():
        os.replace(dst, old)
    os.replace(src, dst)
    if old.exists():
        shutil.rmtree(old)


def train_default(out_dir: str | Path = DEFAULT_CLIP_DIR, seed: int = DEFAULTS["seed"], steps: int = DEFAULTS["steps"],
                  batch: int = DEFAULTS["batch"], lr: float = DEFAULTS["lr"], counts: dict | None = None,
                  size: int = DEFAULTS["size"], device: str | None = None, progress: bool = True,
                  log=print) -> dict:
    """Build pairs, tokenizer and model; train; publish to `out_dir`. Returns a summary dict."""
    from tqdm.auto import tqdm
    from transformers import CLIPModel

    t0 = time.time()
    counts = dict(counts or DEFAULTS["counts"])
    torch.manual_seed(seed)
    dev = torch.device(device) if device else default_device()
    pairs = build_pairs(counts, seed, size, progress=progress)
    images = torch.from_numpy(pairs.array()).permute(0, 3, 1, 2).contiguous()  # uint8 (N, 3, S, S)
    if dev.type == "cuda":  # the whole set fits (uint8): no host-to-device copy or host augmentation per step
        images = images.to(dev)
    n = len(pairs)
    log(f"{n} pairs ({sum(k == 'region' for k in pairs.kind)} region crops) in {time.time() - t0:.0f}s")

    extra = [t.format(w) for w in ("finding",) for t in POSITIVE_TEMPLATES + NEGATIVE_TEMPLATES + REGION_TEMPLATES + NEGATION_TEMPLATES]
    tok = build_tokenizer([c for caps in pairs.captions for c in caps] + extra)
    ids = {t: tok.convert_tokens_to_ids(t) for t in (PAD, SOT, EOT)}
    config = small_clip_config(len(tok), ids[PAD], ids[SOT], ids[EOT], vision={"image_size": size})
    model = CLIPModel(config).to(dev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    mean = torch.tensor((0.48145466, 0.4578275, 0.40821073), device=images.device).view(1, 3, 1, 1)
    std = torch.tensor((0.26862954, 0.26130258, 0.27577711), device=images.device).view(1, 3, 1, 1)
    g = torch.Generator().manual_seed(seed)  # batch indices (CPU)
    g_aug = torch.Generator(device=images.device).manual_seed(seed) if dev.type == "cuda" else g
    rng = np.random.default_rng(seed)
    max_len = config.text_config.max_position_embeddings
    amp = dev.type == "cuda"
    losses = []
    bar = tqdm(range(steps), desc="train-default", disable=not progress, mininterval=5)
    for step in bar:
        idx = torch.randperm(n, generator=g)[:batch]
        # half the time a caption naming what is present: small findings are otherwise drowned
        # out by the many true negations of a report
        pools = [pairs.positives[i] if rng.random() < 0.5 else pairs.captions[i] for i in idx.tolist()]
        caps = [pool[rng.integers(len(pool))] for pool in pools]
        x = _augment(images[idx.to(images.device)].float() / 255.0, g_aug)
        x = ((x - mean) / std).to(dev)
        enc = tok(caps, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        same = torch.tensor([[a == b for b in caps] for a in caps], dtype=torch.float32, device=dev)
        target = same / same.sum(1, keepdim=True)
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=amp):
            img = F.normalize(model.visual_projection(model.vision_model(pixel_values=x).pooler_output), dim=-1)
            txt = F.normalize(model.text_projection(model.text_model(
                input_ids=enc["input_ids"].to(dev), attention_mask=enc["attention_mask"].to(dev)).pooler_output), dim=-1)
            logits = model.logit_scale.exp().clamp(max=100) * img.float() @ txt.float().T
            loss = 0.5 * (torch.sum(-target * logits.log_softmax(1), 1).mean()
                          + torch.sum(-target * logits.T.log_softmax(1), 1).mean())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 20 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
    model.eval().cpu()
    Path(out_dir).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".default_clip_", dir=Path(out_dir).parent))
    tok.save_pretrained(str(tmp))
    model.save_pretrained(str(tmp))  # config.json + model.safetensors
    summary = {
        "seed": seed, "steps": steps, "batch": batch, "lr": lr, "counts": counts, "image_size": size,
        "pairs": n, "params": sum(p.numel() for p in model.parameters()), "final_loss": float(np.mean(losses[-20:])),
        "device": str(dev), "torch_threads": torch.get_num_threads(), "seconds": round(time.time() - t0, 1),
        "machine": f"{platform.machine()} {os.cpu_count()} cpu", "command": "clinlens train-default",
    }
    (tmp / "training.json").write_text(json.dumps(summary, indent=2))
    tmp.chmod(0o755)
    for f in tmp.iterdir():
        f.chmod(0o644)
    publish_dir(tmp, Path(out_dir))
    log(f"published {out_dir} ({summary['params'] / 1e6:.2f}M params, loss {summary['final_loss']:.3f}, {summary['seconds']}s)")
    return summary
