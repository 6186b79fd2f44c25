"""Training of the MedP-CLIP region parts (methods.md §1, "Segmentation" and "Losses").

- Data: (image float [H, W, 3] in [0, 1], object mask, caption[, prompt mask]) from phantoms
  (`phantom_region_examples`: every present chest finding, the derm lesion and its spatial
  concepts, CT findings on slices through them, and slice-propagation pairs whose prompt is the
  neighbouring slice's mask, some past the object's end with an empty target) or from datastore
  label maps (`label_examples`).
- Interaction is simulated as in MONAI Label DeepEdit: a first click inside the object (sampled
  towards its centre through the distance transform), with some probability a jittered box or a
  perturbed mask prompt (as in slice propagation) instead or as well, then 0..`max_clicks`
  corrective clicks, each at the centre of the largest error region of the current prediction
  (foreground click in a false negative, background click in a false positive). With probability
  `p_prev`, an episode's corrective rounds also pass the previous prediction as mask prompt (SAM's
  iterative training), so a viewer session that refines its last mask is in distribution.
- Losses: Dice + BCE on the mask at the decoder's 56x56 window resolution, region–text InfoNCE
  between the region embedding and the caption's frozen text embedding, a small global term that
  keeps the global embedding on the plain CLIP's, and a small IoU-prediction term.
- Trunk and text tower are frozen (the trunk comes from the CLIP directory and is cached at
  inference). CUDA + bf16 autocast when available; the result is published atomically with
  `RegionCLIP.save`.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from scipy import ndimage as ndi

from clinlens.data.conventions import ResizeMap
from clinlens.data.image_io import to_unit_rgb
from clinlens.data.pairs import REGION_TEMPLATES
from clinlens.data.phantoms import DERM_SPATIAL, make_chest, make_ct, make_derm, mask_box
from clinlens.models.clip import DEFAULT_CLIP_DIR, load_clip
from clinlens.models.region_clip import RegionCLIP, dice_bce_loss, region_path
from clinlens.models.region_predictor import crop_window, focus_window

# derm concepts whose mask is one contiguous region worth clicking on
_DERM_OBJECTS = [c for c in DERM_SPATIAL if c in ("pigment network", "blue-white veil")]
DEFAULTS = dict(steps=3000, batch=16, lr=1e-3, k=2, n_examples=900, time_budget_s=None)


# ----------------------------------------------------------------------------- data
def phantom_region_examples(seed: int, n: int, size: int = 256, families=("chest", "derm", "ct"),
                            ct_shape=(48, 128, 128), min_pixels: int = 12, propagation: bool = True):
    """Yield `n` (image float [H, W, 3], mask bool [H, W], caption) objects from phantoms; with
    `propagation`, CT also gives (image, mask, caption, neighbouring slice's mask) propagation steps."""
    rng = np.random.default_rng(seed)
    count = 0
    for i in itertools.count():
        fam = families[i % len(families)]
        s_seed = seed * 1_000_003 + 900_000 + i
        objs = []
        if fam == "chest":
            s = make_chest(s_seed, size=size)
            img = to_unit_rgb(s.image)
            objs = [(img, m, name) for name, m in s.masks.items()]
        elif fam == "derm":
            s = make_derm(s_seed, size=size)
            img = to_unit_rgb(s.image)
            objs = [(img, s.masks["lesion"], s.diagnosis)]
            objs += [(img, s.masks[c], c) for c in _DERM_OBJECTS if c in s.masks]
        else:
            s = make_ct(s_seed, shape=ct_shape)
            for name, m in s.masks.items():
                zs = np.flatnonzero(m.any(axis=(1, 2)))
                if not len(zs):
                    continue
                area = m.sum(axis=(1, 2))
                picks = {int(zs[np.argmax(area[zs])]), int(rng.choice(zs))}
                objs += [(to_unit_rgb(s.image[z]), m[z], name) for z in sorted(picks)]
                if propagation:
                    objs += [(to_unit_rgb(s.image[z]), m[z], name, m[zp]) for z, zp in propagation_pairs(m, rng)]
        for img, m, cap, *prompt in objs:
            if m.sum() >= min_pixels or (prompt and prompt[0].sum() >= min_pixels):
                yield (img, m.astype(bool), cap, *prompt)
                count += 1
                if count >= n:
                    return


def propagation_pairs(m3: np.ndarray, rng, n: int = 2) -> list[tuple[int, int]]:
    """(slice, neighbour) pairs for learning slice propagation: the neighbour's mask is the prompt, the
    slice's mask the target. One pair sits at an end of the object (target empty: propagation must stop)."""
    zs = np.flatnonzero(m3.any(axis=(1, 2)))
    if len(zs) < 2:
        return []
    pairs = []
    end = int(rng.integers(2))  # the slice just past the bottom or the top end of the object
    z_out, z_in = (int(zs[0]) - 1, int(zs[0])) if end == 0 else (int(zs[-1]) + 1, int(zs[-1]))
    if 0 <= z_out < len(m3):
        pairs.append((z_out, z_in))
    for _ in range(n - len(pairs)):
        z = int(rng.choice(zs[1:]))
        pairs.append((z, z - 1) if rng.random() < 0.5 else (int(zs[np.searchsorted(zs, z) - 1]), z))
    return pairs


def label_examples(image_paths, label_paths, label_names, slices_per_label: int = 3, seed: int = 0,
                   propagation: bool = True):
    """Yield (image, mask, caption) from datastore label maps: each label index is one object.

    `label_names` maps name -> index ({"nodule": 1}) or is a list (index i + 1 -> name). 3D volumes
    give up to `slices_per_label` axial slices per label (the largest one first) and, with
    `propagation`, one slice-propagation step (image, mask, caption, neighbouring slice's mask)."""
    from clinlens.data.image_io import load_image

    names = ({i + 1: n for i, n in enumerate(label_names)} if isinstance(label_names, (list, tuple))
             else {int(v): k for k, v in dict(label_names).items()})
    rng = np.random.default_rng(seed)
    for ip, lp in zip(image_paths, label_paths):
        im, lab = load_image(ip), load_image(lp).array
        arr = im.array
        if lab.ndim == 2:
            plane = to_unit_rgb(arr)
            for idx, name in names.items():
                m = lab == idx
                if m.any():
                    yield plane, m, name
            continue
        for idx, name in names.items():
            m3 = lab == idx
            area = m3.sum(axis=(1, 2))
            zs = np.flatnonzero(area)
            if not len(zs):
                continue
            pick = [int(zs[np.argmax(area[zs])])]
            rest = [z for z in zs if z != pick[0]]
            pick += [int(z) for z in rng.choice(rest, min(len(rest), slices_per_label - 1), replace=False)] if rest else []
            for z in pick:
                yield to_unit_rgb(arr[z]), m3[z], name
            if propagation:
                for z, zp in propagation_pairs(m3, rng, n=1):
                    yield to_unit_rgb(arr[z]), m3[z], name, m3[zp]


# ----------------------------------------------------------------------------- interaction simulation
def center_click(mask: np.ndarray, rng=None, power: float = 2.0) -> tuple[float, float]:
    """An (x, y) point inside `mask`: the deepest point (rng None) or sampled with p ~ distance^power."""
    d = ndi.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    if rng is None:
        y, x = np.unravel_index(np.argmax(d), d.shape)
        return float(x), float(y)
    p = d.ravel() ** power
    i = rng.choice(p.size, p=p / p.sum())
    y, x = np.unravel_index(i, d.shape)
    return float(x), float(y)


def error_click(pred: np.ndarray, target: np.ndarray):
    """DeepEdit corrective click: centre of the largest error component -> ((x, y), label) or None."""
    best = None
    for err, label in ((target & ~pred, 1), (pred & ~target, 0)):
        lab, n = ndi.label(err)
        if n == 0:
            continue
        sizes = np.bincount(lab.ravel())[1:]
        j = int(np.argmax(sizes)) + 1
        if best is None or sizes[j - 1] > best[0]:
            best = (sizes[j - 1], lab == j, label)
    if best is None:
        return None
    return center_click(best[1]), best[2]


def _perturb_mask(mask: np.ndarray, rng) -> np.ndarray:
    """A neighbouring-slice-like mask: random dilation/erosion and shift."""
    r = max(1, int(round(0.08 * np.sqrt(mask.sum()))))
    it = int(rng.integers(-r, r + 1))
    m = ndi.binary_dilation(mask, iterations=it) if it > 0 else (ndi.binary_erosion(mask, iterations=-it) if it < 0 else mask)
    if not m.any():
        m = mask
    sh = rng.integers(-r, r + 1, 2)
    return np.roll(m, tuple(int(v) for v in sh), axis=(0, 1))


def _jitter_box(box, rng, frac: float = 0.1):
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    d = rng.uniform(-frac, frac, 4) * np.array([w, h, w, h])
    b = np.array(box, float) + d
    return [min(b[0], b[2] - 1), min(b[1], b[3] - 1), max(b[2], b[0] + 1), max(b[3], b[1] + 1)]


class _Episode:
    """One training example's window, model-grid prompts and targets."""

    __slots__ = ("pixels", "target", "points", "labels", "box", "mask_prompt", "caption")


def _make_episode(img_u8, mask, caption, prompt, rng, S: int, mask_hw, min_side: int, expand: float, p_box: float,
                  p_mask: float, augment: bool):
    """`prompt` (a neighbouring slice's mask) or None; with it the episode is a propagation step
    (mask + its box as prompts, no click) and `mask` may be empty."""
    img = img_u8
    if augment and rng.random() < 0.3:  # rotations/flips: fine for segmentation and name captions
        k = int(rng.integers(1, 4))
        img, mask = np.rot90(img, k), np.rot90(mask, k)
        prompt = None if prompt is None else np.rot90(prompt, k)
        if rng.random() < 0.5:
            img, mask = img[:, ::-1], mask[:, ::-1]
            prompt = None if prompt is None else prompt[:, ::-1]
    H, W = mask.shape
    mode = 2 if prompt is not None else rng.choice(3, p=[1 - p_box - p_mask, p_box, p_mask])
    fg, box, mprompt = [], None, None
    if prompt is None and (mode == 0 or rng.random() < 0.35):
        fg.append(center_click(mask, rng))
    if mode == 1:
        box = _jitter_box(mask_box(mask), rng)
    if mode == 2:
        mprompt = _perturb_mask(mask if prompt is None else prompt, rng)
        box = mask_box(mprompt)
    scale = rng.uniform(0.75, 1.8) if augment else 1.0
    win = focus_window((H, W), fg, box, mprompt, expand * rng.uniform(0.8, 1.3) if augment else expand,
                       int(min_side * scale))
    if augment:  # shift the window a little (the click is not always central)
        side = win[2] - win[0]
        sh = (rng.uniform(-0.15, 0.15, 2) * side).astype(int)
        x0 = int(np.clip(win[0] + sh[0], min(0, W - side), max(0, W - side)))
        y0 = int(np.clip(win[1] + sh[1], min(0, H - side), max(0, H - side)))
        win = (x0, y0, x0 + side, y0 + side)
    side = win[2] - win[0]
    crop = torch.from_numpy(crop_window(np.ascontiguousarray(img), win)).permute(2, 0, 1)[None].float() / 255
    ep = _Episode()
    ep.pixels = F.interpolate(crop, size=(S, S), mode="bilinear", align_corners=False, antialias=True)[0]
    m = torch.from_numpy(crop_window(np.ascontiguousarray(mask), win).astype(np.float32))[None, None]
    ep.target = F.interpolate(m, size=mask_hw, mode="area")[0]
    rm = ResizeMap((side, side), (S, S))
    off = np.array(win[:2], float)
    ep.points = [tuple(p) for p in rm.points_to_model(np.asarray(fg, float).reshape(-1, 2) - off)]
    ep.labels = [1] * len(ep.points)
    ep.box = None if box is None else rm.points_to_model(np.asarray(box, float).reshape(2, 2) - 0.5 - off).ravel()
    ep.mask_prompt = None
    if mprompt is not None:
        mp = torch.from_numpy(crop_window(np.ascontiguousarray(mprompt), win).astype(np.float32))[None, None]
        ep.mask_prompt = F.interpolate(mp, size=mask_hw, mode="bilinear", align_corners=False, antialias=True)[0]
    ep.caption = caption
    return ep


def _augment_intensity(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """(B, 3, S, S) in [0, 1]: contrast, brightness, gamma, noise."""
    b = x.shape[0]
    r = lambda lo, hi: lo + (hi - lo) * torch.rand(b, 1, 1, 1, generator=g)  # noqa: E731
    x = (x - 0.5) * r(0.7, 1.35) + 0.5 + r(-0.1, 0.1)
    x = x.clamp(0, 1) ** torch.exp(r(-0.35, 0.35))
    return (x + r(0, 0.03) * torch.randn(x.shape, generator=g)).clamp(0, 1)


def _batch_prompts(eps, dev):
    """Pad the episodes' prompts into (points, labels, boxes, mask_prompt) tensors (NaN = absent)."""
    n = max(len(e.points) for e in eps)
    points = labels = boxes = mask = None
    if n:
        points = torch.zeros(len(eps), n, 2)
        labels = torch.full((len(eps), n), -1, dtype=torch.long)
        for i, e in enumerate(eps):
            if e.points:
                points[i, : len(e.points)] = torch.tensor(e.points, dtype=torch.float32)
                labels[i, : len(e.points)] = torch.tensor(e.labels)
        points, labels = points.to(dev), labels.to(dev)
    if any(e.box is not None for e in eps):
        boxes = torch.tensor(np.stack([e.box if e.box is not None else np.full(4, np.nan) for e in eps]),
                             dtype=torch.float32, device=dev)
    if any(e.mask_prompt is not None for e in eps):
        ref = next(e.mask_prompt for e in eps if e.mask_prompt is not None)
        mask = torch.stack([e.mask_prompt if e.mask_prompt is not None else torch.full_like(ref, float("nan"))
                            for e in eps]).to(dev)
    return points, labels, boxes, mask


# ----------------------------------------------------------------------------- training
def _as_pool(samples_or_iterator, max_pool: int):
    """Materialise examples as (uint8 image, bool mask, caption) to keep memory small."""
    it = samples_or_iterator if isinstance(samples_or_iterator, (list, tuple)) else itertools.islice(samples_or_iterator, max_pool)
    pool = []
    for img, m, cap, *prompt in it:
        img = np.asarray(img)
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, -1)
        u8 = img if img.dtype == np.uint8 else (np.clip(img, 0, 1) * 255).round().astype(np.uint8)
        m = np.asarray(m, bool)
        prompt = np.asarray(prompt[0], bool) if prompt and np.any(prompt[0]) else None
        if m.any() or prompt is not None:
            pool.append((u8, m, str(cap), prompt))
    if not pool:
        raise ValueError("no training objects (every mask was empty)")
    return pool


def train_region(bundle, samples_or_iterator, out_path, steps: int = DEFAULTS["steps"], batch: int = DEFAULTS["batch"],
                 lr: float = DEFAULTS["lr"], k: int = DEFAULTS["k"], device=None, log=print, progress: bool = True,
                 seed: int = 0, init=None, max_clicks: int = 4, p_box: float = 0.25, p_mask: float = 0.2,
                 p_prev: float = 0.5,
                 w_text: float = 0.5, w_global: float = 0.1, w_iou: float = 0.1, min_side: int = 96,
                 expand: float = 2.5, max_pool: int = 4000, augment: bool = True, time_budget_s: float | None = None,
                 extra: dict | None = None) -> dict:
    """Train the region parts of a `RegionCLIP` on `bundle`'s frozen CLIP; publish to `out_path`.

    `device` (default: the bundle's) moves the bundle's CLIP there. `init` is a region checkpoint to
    continue from (its k wins). Returns a summary dict (also written to the JSON beside the file).
    Inside an initialised `torch.distributed` group (`train_region_ddp`) the trainable step runs under
    DistributedDataParallel, each rank draws its own episodes, and rank 0 publishes."""
    from tqdm.auto import tqdm

    t0 = time.time()
    rank, world = (dist.get_rank(), dist.get_world_size()) if _distributed() else (0, 1)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed if world == 1 else [seed, rank])
    g = torch.Generator().manual_seed(seed + rank)
    if rank:
        log, progress = (lambda *_: None), False
    dev = torch.device(device) if device is not None else bundle.device
    if dev != bundle.device:
        bundle.model.to(dev)
        bundle.device = dev
    clip = bundle.model.eval()
    for p in clip.parameters():
        p.requires_grad_(False)
    model = RegionCLIP.load(bundle, init, device=dev) if init else RegionCLIP(clip, k=k).to(dev)
    model.train()
    step_fn = model.forward_from_trunk
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        step_fn = DDP(_Step(model), device_ids=[dev.index] if dev.type == "cuda" else None,
                      find_unused_parameters=True)
    pool = _as_pool(samples_or_iterator, max_pool)
    names = sorted({c for _, _, c, _ in pool})
    log(f"{len(pool)} objects, {len(names)} captions, prep {time.time() - t0:.1f}s")
    with torch.no_grad():
        text = torch.stack([bundle.encode_texts([t.format(n) for n in names], cache=False).float()
                            for t in REGION_TEMPLATES])  # (templates, names, D)
        scale = float(bundle.logit_scale)
    S, mask_hw = model.image_size, model.prompt_encoder.mask_hw
    mean = torch.tensor(bundle.preprocess.mean).view(1, 3, 1, 1)
    std = torch.tensor(bundle.preprocess.std).view(1, 3, 1, 1)
    slow = [p for n, p in model.named_parameters() if n.startswith(("blocks.", "region_ln.", "region_proj."))]
    fast = [p for n, p in model.named_parameters() if not n.startswith(("blocks.", "region_ln.", "region_proj."))]
    opt = torch.optim.AdamW([{"params": fast, "lr": lr}, {"params": slow, "lr": lr * 0.3}], weight_decay=0.01)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    amp = dev.type == "cuda"
    hist = {k_: [] for k_ in ("loss", "dice_loss", "bce", "text", "global", "dice")}
    done = 0
    bar = tqdm(range(steps), desc="train-region", disable=not progress, mininterval=5)
    for step in bar:
        idx = rng.integers(len(pool), size=batch)
        eps = [_make_episode(*pool[i], rng, S, mask_hw, min_side, expand, p_box, p_mask, augment) for i in idx]
        x = torch.stack([e.pixels for e in eps])
        if augment:
            x = _augment_intensity(x, g)
        x = ((x - mean) / std).to(dev)
        target = torch.stack([e.target for e in eps]).to(dev)
        tgt_np = (target[:, 0] > 0.5).cpu().numpy()
        cap = torch.tensor([names.index(e.caption) for e in eps], device=dev)
        with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            hidden = model.trunk(x)
            plain = model.plain_from_trunk(hidden).float() if w_global else None
        use_prev = rng.random(len(eps)) < p_prev
        for _ in range(int(rng.integers(0, max_clicks + 1))):  # corrective clicks on the current prediction
            with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
                pred = model.forward_from_trunk(hidden, *_batch_prompts(eps, dev))["mask_logits"][:, 0] > 0
            pred = pred.cpu()
            for e, p_, t_, prev in zip(eps, pred.numpy(), tgt_np, use_prev):
                if prev:
                    e.mask_prompt = torch.from_numpy(p_[None].astype(np.float32))
                c = error_click(p_, t_)
                if c is not None:
                    (cx, cy), lab = c
                    e.points.append(tuple(ResizeMap(mask_hw, (S, S)).points_to_model([[cx, cy]])[0]))
                    e.labels.append(lab)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            out = step_fn(hidden, *_batch_prompts(eps, dev))
            logits = out["mask_logits"].float()
            dl, bce = dice_bce_loss(logits, target)
            loss = dl + bce
            t_emb = text[int(rng.integers(len(REGION_TEMPLATES)))].to(dev)
            present = target.flatten(1).amax(1) > 0  # an empty target (past the object's end) names nothing
            l_text = (F.cross_entropy(scale * out["region_embedding"].float() @ t_emb.T, cap, reduction="none")
                      * present).sum() / present.sum().clamp(min=1)
            loss = loss + w_text * l_text
            l_glob = (1 - (out["global_embedding"].float() * plain).sum(-1)).mean() if w_global else torch.zeros(())
            loss = loss + w_global * l_glob
            with torch.no_grad():
                pb, tb = logits > 0, target > 0.5
                inter, union = (pb & tb).flatten(1).sum(1), (pb | tb).flatten(1).sum(1)
                iou = inter / union.clamp(min=1)
                dice = 2 * inter / (pb.flatten(1).sum(1) + tb.flatten(1).sum(1)).clamp(min=1)
            loss = loss + w_iou * F.mse_loss(out["iou_pred"].float(), iou.float())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        done += 1
        for k_, v in (("loss", loss), ("dice_loss", dl), ("bce", bce), ("text", l_text), ("global", l_glob),
                      ("dice", dice.mean())):
            hist[k_].append(float(v.detach()))
        if step % 10 == 0:
            bar.set_postfix(loss=f"{np.mean(hist['loss'][-20:]):.3f}", dice=f"{np.mean(hist['dice'][-20:]):.2f}")
        stop = time_budget_s is not None and time.time() - t0 > time_budget_s
        if world > 1 and time_budget_s is not None:  # every rank stops at the same step
            flag = torch.tensor([float(stop)], device=dev)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            stop = bool(flag.item())
        if stop:
            log(f"time budget {time_budget_s:.0f}s reached after {done} steps")
            break
    model.eval()
    in_sync = None
    if world > 1:  # DDP keeps the replicas equal: check it, then only rank 0 publishes
        vec = torch.nn.utils.parameters_to_vector([p.detach().float() for p in model.parameters()])
        ref = vec.clone()
        dist.broadcast(ref, 0)
        same = torch.tensor([float(torch.equal(vec, ref))], device=dev)
        dist.all_reduce(same, op=dist.ReduceOp.MIN)
        in_sync = bool(same.item())
    summary = {
        "seed": seed, "steps": done, "steps_planned": steps, "batch": batch, "lr": lr, "k": model.k,
        "objects": len(pool), "captions": names, "max_clicks": max_clicks, "p_prev": p_prev, "min_side": min_side, "expand": expand,
        **{f"final_{k_}": round(float(np.mean(v[-20:])), 4) for k_, v in hist.items()},
        "device": str(dev), "torch_threads": torch.get_num_threads(), "seconds": round(time.time() - t0, 1),
        "machine": f"{platform.machine()} {os.cpu_count()} cpu", "clip": str(bundle.path),
        "world_size": world, **({"replicas_in_sync": in_sync} if world > 1 else {}), **(extra or {}),
    }
    if rank == 0:
        model.save(out_path, extra={"training": summary})
        log(f"published {out_path}: {done} steps, train dice {summary['final_dice']:.3f}, {summary['seconds']}s")
    if world > 1:
        dist.barrier()
    return summary


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _Step(torch.nn.Module):
    """The trainable part of one step as a module, so DistributedDataParallel can wrap it."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, hidden, *prompts):
        return self.model.forward_from_trunk(hidden, *prompts)


def _ddp_worker(rank, world, backend, port, clip_path, examples, out_path, kw, result_path):
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        device = f"cuda:{rank}" if backend == "nccl" else "cpu"
        if backend == "nccl":
            torch.cuda.set_device(rank)
        else:
            torch.set_num_threads(1)
        summary = train_region(load_clip(clip_path, device=device), examples, out_path, **kw)
        if rank == 0:
            Path(result_path).write_text(json.dumps(summary))
    finally:
        dist.destroy_process_group()


def train_region_ddp(clip_path, examples, out_path, world_size: int | None = None, backend: str | None = None,
                     **kw) -> dict:
    """`train_region` on `world_size` processes (default: every GPU), one per GPU with NCCL, or CPU
    processes with gloo (tests): MONAI Label's multi-GPU pattern (torch.multiprocessing.spawn + DDP).
    Each rank draws `batch` episodes per step, so the global batch is world_size x batch."""
    import tempfile

    import torch.multiprocessing as mp

    from clinlens.server import free_port

    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    world_size = world_size or (torch.cuda.device_count() if backend == "nccl" else 2)
    examples = list(examples)
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "summary.json"
        mp.spawn(_ddp_worker, args=(world_size, backend, free_port(), str(clip_path), examples, str(out_path), kw,
                                    str(result)), nprocs=world_size, join=True)
        return json.loads(result.read_text())


def train_region_default(out_dir=DEFAULT_CLIP_DIR, seed: int = 0, steps: int = DEFAULTS["steps"],
                         batch: int = DEFAULTS["batch"], n_examples: int = DEFAULTS["n_examples"],
                         device=None, progress: bool = True, log=print,
                         time_budget_s: float | None = DEFAULTS["time_budget_s"], cpu_threads: int | None = 1,
                         **kw) -> dict:
    """Train the shipped region model from phantoms on the CLIP in `out_dir`; writes `out_dir/region.safetensors`.

    Measured: 3000 steps x 16 (900 phantom objects) in 1788 s on 2 CPU cores shared with other jobs, 1 torch
    thread. On CPU it runs `cpu_threads` torch threads (1 by default: on 2 cores shared with another
    torch process, 2 OpenMP threads ran 5-20x slower); `time_budget_s` (off by default, so the
    result depends only on the seed) stops early and still publishes."""
    t0 = time.time()
    bundle = load_clip(out_dir, device=device)
    old = torch.get_num_threads()
    if bundle.device.type == "cpu" and cpu_threads:
        torch.set_num_threads(cpu_threads)
    log(f"train-region: {steps} steps x batch {batch} on {n_examples} phantom objects, "
        f"{torch.get_num_threads()} torch thread(s); about 25-30 minutes on 2 CPU cores, less with a GPU"
        + (f" (hard stop after {time_budget_s:.0f}s)" if time_budget_s else ""))
    try:
        examples = phantom_region_examples(seed, n_examples)
        summary = train_region(bundle, examples, region_path(out_dir), steps=steps, batch=batch, seed=seed,
                               progress=progress, log=log, time_budget_s=time_budget_s,
                               extra={"command": "clinlens train-region"}, **kw)
    finally:
        torch.set_num_threads(old)
    log(f"train-region done in {(time.time() - t0) / 60:.1f} min")
    return summary


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="clinlens train-region", description=train_region_default.__doc__)
    ap.add_argument("--out-dir", default=str(DEFAULT_CLIP_DIR), help="CLIP directory (region.safetensors goes here)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=DEFAULTS["steps"])
    ap.add_argument("--batch", type=int, default=DEFAULTS["batch"])
    ap.add_argument("--examples", type=int, default=DEFAULTS["n_examples"])
    ap.add_argument("--device", default=None)
    ap.add_argument("--minutes", type=float, default=None, help="optional hard time budget (stops early, still publishes)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    a = ap.parse_args(argv)
    return train_region_default(Path(a.out_dir), a.seed, a.steps, a.batch, a.examples, a.device,
                                time_budget_s=a.minutes * 60 if a.minutes else None, cpu_threads=a.threads or None)


if __name__ == "__main__":
    main()
