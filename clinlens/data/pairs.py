"""Image–text pairs from phantoms for contrastive CLIP training and zero-shot evaluation.

Each phantom gives whole-image pairs (the report, its sentences, structured positive and
negated statements) and region-crop pairs (a crop round each finding, captioned by its name).
CT volumes give axial slices, captioned by what the slice itself contains.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from clinlens.data.image_io import to_unit_rgb
from clinlens.data.phantoms import make_sample

FAMILY_NOUN = {"chest": "chest x-ray", "derm": "dermoscopy image", "ct": "ct slice"}
REGION_TEMPLATES = ("{}.", "there is {}.", "{} is present.", "region of {}.")
NEGATION_TEMPLATES = ("no {}.", "no evidence of {}.", "{} is absent.", "without {}.")


def sentences(report: str) -> list[str]:
    return [s.strip() for s in re.split(r"(?<=\.)\s+", report) if s.strip()]


def resize_rgb(img01: np.ndarray, size: int) -> np.ndarray:
    """float [H, W, 3] -> uint8 [size, size, 3] (antialiased)."""
    t = torch.from_numpy(np.ascontiguousarray(img01)).permute(2, 0, 1)[None]
    t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return (t[0].permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8)


def square_crop(shape_yx, box_xyxy, rng, scale=(1.6, 3.0)) -> tuple[int, int, int, int]:
    """A square window round a box, enlarged by a random factor, kept inside the image."""
    h, w = shape_yx
    x0, y0, x1, y1 = box_xyxy
    side = int(max(x1 - x0, y1 - y0, 8) * rng.uniform(*scale))
    side = min(side, h, w)
    cx = (x0 + x1) / 2 + rng.uniform(-0.15, 0.15) * side
    cy = (y0 + y1) / 2 + rng.uniform(-0.15, 0.15) * side
    xa = int(np.clip(cx - side / 2, 0, w - side))
    ya = int(np.clip(cy - side / 2, 0, h - side))
    return xa, ya, xa + side, ya + side


@dataclass
class PairSet:
    """Images (uint8 [N, S, S, 3]) with a pool of true captions each, plus labels for evaluation."""

    images: list = field(default_factory=list)
    captions: list = field(default_factory=list)  # list[list[str]]: every true caption
    positives: list = field(default_factory=list)  # list[list[str]]: the ones naming a present finding
    kind: list = field(default_factory=list)  # "image" | "region"
    family: list = field(default_factory=list)
    labels: list = field(default_factory=list)  # dict finding -> 0/1 (whole images), {name: 1} (regions)

    def add(self, img, caps, kind, family, labels, positives=None):
        self.images.append(img)
        self.captions.append(caps)
        self.positives.append(list(caps) if positives is None else positives)
        self.kind.append(kind)
        self.family.append(family)
        self.labels.append(labels)

    def array(self) -> np.ndarray:
        return np.stack(self.images)

    def __len__(self):
        return len(self.images)


def _statements(family: str, present: dict) -> tuple[list[str], list[str]]:
    """Structured captions: (positive statements, negated statements)."""
    noun = FAMILY_NOUN[family]
    pos, neg = [], []
    for name, on in present.items():
        if on:
            pos += [t.format(name) for t in REGION_TEMPLATES[:3]] + [f"{noun} with {name}."]
        else:
            neg += [t.format(name) for t in NEGATION_TEMPLATES]
    if not any(present.values()):
        pos.append(f"normal {noun}.")
    return pos, neg


def _regions(out: PairSet, plane01, masks2d: dict, family: str, size: int, rng, crops: int):
    for name, m in masks2d.items():
        if name == "lesion" or not m.any():
            continue
        ys, xs = np.nonzero(m)
        box = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        for _ in range(crops):
            xa, ya, xb, yb = square_crop(m.shape, box, rng)
            crop = resize_rgb(plane01[ya:yb, xa:xb], size)
            out.add(crop, [t.format(name) for t in REGION_TEMPLATES], "region", family, {name: 1})


def _make(job: tuple):
    """(family, seed, gen_size) -> the phantom (a module-level function, so worker processes can run it)."""
    family, seed, gen_size = job
    return make_sample("ct", seed) if family == "ct" else make_sample(family, seed, size=gen_size)


def add_phantom(out: PairSet, family: str, seed: int, size: int, rng, crops: int = 1, gen_size: int = 256,
                ct_slices: int = 4, sample=None):
    """Generate one phantom (or take `sample`, the one `_make` gives for it) and append its whole-image and
    region pairs."""
    s = sample if sample is not None else _make((family, seed, gen_size))
    if family == "ct":
        vol = s.image
        lesion_z = [int(np.nonzero(m.any(axis=(1, 2)))[0].mean()) for m in s.masks.values() if m.any()]
        zs = lesion_z + list(rng.integers(vol.shape[0] // 6, vol.shape[0] * 5 // 6, max(ct_slices - len(lesion_z), 1)))
        for z in zs[:ct_slices]:
            plane = to_unit_rgb(vol[z])
            present = {f: int(bool(m[z].any())) for f, m in s.masks.items()}
            present.update({f: 0 for f in s.concepts if f not in present})
            pos, neg = _statements("ct", present)
            out.add(resize_rgb(plane, size), pos + neg, "image", "ct", present, positives=pos)
            _regions(out, plane, {f: m[z] for f, m in s.masks.items()}, "ct", size, rng, crops)
        return s
    plane = to_unit_rgb(s.image)
    pos, neg = _statements(family, s.concepts)
    if s.diagnosis:
        pos += [f"{s.diagnosis}.", f"consistent with {s.diagnosis}."] if family == "derm" else [f"impression: {s.diagnosis}."]
    caps = [s.report] + sentences(s.report) + pos + neg
    out.add(resize_rgb(plane, size), caps, "image", family, dict(s.concepts), positives=pos)
    _regions(out, plane, s.masks, family, size, rng, crops)
    return s


def build_pairs(counts: dict, seed: int, size: int, progress: bool = True, crops: int = 1,
                workers: int | None = None) -> PairSet:
    """`counts` like {"chest": 1200, "derm": 800, "ct": 60}; seeds are `seed*1_000_003 + index`.

    The phantoms are generated by `workers` processes (default: every CPU, from 64 phantoms up) and turned
    into pairs in order in this one, so the result does not depend on the worker count."""
    import multiprocessing
    import os

    from tqdm.auto import tqdm

    rng = np.random.default_rng(seed)
    out = PairSet()
    jobs = [(fam, seed * 1_000_003 + i + {"chest": 0, "derm": 300_000, "ct": 600_000}[fam], 256)
            for fam, n in counts.items() for i in range(n)]
    if workers is None:
        workers = (os.cpu_count() or 1) if len(jobs) >= 64 else 1
    bar = tqdm(total=len(jobs), desc="phantom pairs", disable=not progress, mininterval=2)
    # fork where there is one, as torch's DataLoader workers do: the workers run numpy/scipy only, and
    # spawn would re-run the caller's __main__ (and hang on `python -`)
    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    pool = ctx.Pool(workers) if workers > 1 else None
    try:
        samples = pool.imap(_make, jobs, chunksize=8) if pool else (None for _ in jobs)
        for (fam, s_seed, gen), sample in zip(jobs, samples):
            add_phantom(out, fam, s_seed, size, rng, crops, gen_size=gen, sample=sample)
            bar.update()
    finally:
        bar.close()
        if pool:
            pool.terminate()
    return out
