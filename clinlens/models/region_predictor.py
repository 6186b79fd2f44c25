"""MedP-CLIP click path (methods.md §1; DESIGN.md "Data flow (one click)"): a per-image predictor
in the shape of segment-anything's `predictor.py`.

- **Focus window.** The model sees a square crop round the prompts: the bounding box of points,
  box and mask prompt, enlarged `expand` times, at least `min_side` px (and `min_frac` of the
  longer image side), shifted to lie inside the image (zero-padded only when the image is smaller
  than the window), resized to the model input. Follow-up prompts that all stay inside the
  current window of that image/slice reuse it.
- **Trunk cache.** LRU (default 16) of trunk outputs keyed by (image_key, slice, window, model
  stamp); the stamp holds the region file's and the CLIP weights' mtimes, so a republished model
  never answers from stale features (and is reloaded).
- Coordinates: points are image (x, y) pixel indices, boxes half-open [x0, y0, x1, y1]; the
  mapping to the model grid is `clinlens.data.conventions.ResizeMap` on the window.
- 3D: `propagate_3d` walks slice by slice using the previous mask (and its box) as prompt;
  `predict_3d` segments the clicked slices and propagates from each.
"""
from __future__ import annotations

import math
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from clinlens.data.conventions import ResizeMap
from clinlens.data.phantoms import mask_box
from clinlens.models.region_clip import RegionCLIP, region_path


def focus_window(hw, points=(), box=None, mask=None, expand: float = 2.5, min_side: int = 96,
                 min_frac: float = 0.0) -> tuple[int, int, int, int]:
    """Square half-open window (x0, y0, x1, y1) round the prompts on an image of shape `hw`."""
    H, W = hw
    lo, hi = [], []
    pts = np.asarray(points, float).reshape(-1, 2)
    if len(pts):
        lo.append(pts.min(0))
        hi.append(pts.max(0) + 1)
    if box is not None:
        lo.append(np.asarray(box[:2], float))
        hi.append(np.asarray(box[2:4], float))
    if mask is not None and np.any(mask):
        mb = mask_box(np.asarray(mask, bool))
        lo.append(np.asarray(mb[:2], float))
        hi.append(np.asarray(mb[2:], float))
    if not lo:  # nothing localises: the whole image
        lo, hi = [np.zeros(2)], [np.array([W, H], float)]
    a, b = np.min(lo, 0), np.max(hi, 0)
    side = max(float((b - a).max()) * expand, min_side, min_frac * max(H, W))
    side = int(min(math.ceil(side), max(H, W)))
    c = (a + b) / 2
    out = []
    for ci, n in zip(c, (W, H)):
        s0 = math.floor(ci - side / 2 + 0.5)
        s0 = min(max(s0, 0), n - side) if side <= n else (n - side) // 2
        out.append(s0)
    return out[0], out[1], out[0] + side, out[1] + side


def crop_window(image: np.ndarray, window) -> np.ndarray:
    """The window of an [H, W(, C)] array; parts outside the image are zero."""
    x0, y0, x1, y1 = window
    H, W = image.shape[:2]
    out = np.zeros((y1 - y0, x1 - x0) + image.shape[2:], image.dtype)
    ya, yb, xa, xb = max(y0, 0), min(y1, H), max(x0, 0), min(x1, W)
    out[ya - y0: yb - y0, xa - x0: xb - x0] = image[ya:yb, xa:xb]
    return out


def paste_window(full_hw, window, patch: np.ndarray) -> np.ndarray:
    """Inverse of `crop_window` for a (side, side) map: zeros outside the window."""
    x0, y0, x1, y1 = window
    H, W = full_hw
    out = np.zeros((H, W), patch.dtype)
    ya, yb, xa, xb = max(y0, 0), min(y1, H), max(x0, 0), min(x1, W)
    out[ya:yb, xa:xb] = patch[ya - y0: yb - y0, xa - x0: xb - x0]
    return out


def _inside(window, points=(), box=None, mask=None) -> bool:
    x0, y0, x1, y1 = window
    pts = np.asarray(points, float).reshape(-1, 2)
    if len(pts) and not ((pts[:, 0] >= x0) & (pts[:, 0] < x1) & (pts[:, 1] >= y0) & (pts[:, 1] < y1)).all():
        return False
    if box is not None and not (box[0] >= x0 and box[1] >= y0 and box[2] <= x1 and box[3] <= y1):
        return False
    if mask is not None and np.any(mask):
        return _inside(window, box=mask_box(np.asarray(mask, bool)))
    return True


def window_prompts(window, model_size: int, fg_xy=(), bg_xy=(), box=None):
    """Image-pixel prompts -> model-grid tensors (points (1, N, 2), labels (1, N), boxes (1, 4) or None)."""
    x0, y0, x1, y1 = window
    rm = ResizeMap((y1 - y0, x1 - x0), (model_size, model_size))
    off = np.array([x0, y0], float)
    fg = np.asarray(fg_xy, float).reshape(-1, 2)
    bg = np.asarray(bg_xy, float).reshape(-1, 2)
    pts = rm.points_to_model(np.concatenate([fg, bg]) - off)
    labels = np.r_[np.ones(len(fg)), np.zeros(len(bg))]
    points = torch.tensor(pts, dtype=torch.float32)[None] if len(pts) else None
    labels = torch.tensor(labels, dtype=torch.long)[None] if len(pts) else None
    boxes = None
    if box is not None:  # half-open pixel box -> continuous edges (pixel centres at integers)
        corners = np.asarray(box, float).reshape(2, 2) - 0.5 - off
        boxes = torch.tensor(rm.points_to_model(corners).reshape(1, 4), dtype=torch.float32)
    return points, labels, boxes


class RegionPredictor:
    """Holds a `RegionCLIP` and its `ClipBundle`; answers many prompts per image with a cached trunk."""

    def __init__(self, model: RegionCLIP, bundle, model_path=None, cache_size: int = 16, expand: float = 2.5,
                 min_side: int = 96, min_frac: float = 0.0, threshold: float = 0.5, max_grow: int = 2):
        self.model, self.bundle = model.eval(), bundle
        self.model_path = Path(model_path) if model_path is not None else None
        self.cache_size, self.expand, self.min_side, self.min_frac = cache_size, expand, min_side, min_frac
        self.threshold = threshold
        self.max_grow = max_grow  # times a window may double when the object runs past its edge
        self._cache: OrderedDict = OrderedDict()
        self._windows: dict = {}
        self._mtime = self._model_mtime()
        self.stats = {"trunk": 0, "click": 0, "hits": 0, "reloads": 0}

    @classmethod
    def from_bundle(cls, bundle, path=None, **kw) -> "RegionPredictor":
        path = Path(path) if path is not None else region_path(bundle.path)
        return cls(RegionCLIP.load(bundle, path), bundle, model_path=path, **kw)

    def _model_mtime(self) -> float:
        p = self.model_path
        return p.stat().st_mtime if p is not None and p.exists() else 0.0

    def _stamp(self):
        m = self._model_mtime()
        if m != self._mtime:  # the region model was republished: reload, drop every cached trunk
            if self.model_path is not None and self.model_path.exists():
                self.model = RegionCLIP.load(self.bundle, self.model_path)
                self.stats["reloads"] += 1
            self._mtime = m
            self._cache.clear()
            self._windows.clear()
        return (m, getattr(self.bundle, "mtime", 0.0))

    def clear(self):
        self._cache.clear()
        self._windows.clear()

    def window(self, image_key, hw, slice: int | None = None):
        """The focus window later clicks on this image (slice) start from, or None."""
        return self._windows.get((image_key, slice, tuple(int(v) for v in hw)))

    def set_window(self, image_key, hw, window, slice: int | None = None) -> None:
        """Set (or with None forget) that window, e.g. to predict from a fresh one and restore it after."""
        key = (image_key, slice, tuple(int(v) for v in hw))
        if window is None:
            self._windows.pop(key, None)
        else:
            self._windows[key] = window

    def _trunk(self, key, image2d, window):
        if key in self._cache:
            self._cache.move_to_end(key)
            self.stats["hits"] += 1
            return self._cache[key], True
        crop = crop_window(np.asarray(image2d, np.float32), window)
        hidden = self.model.trunk(self.bundle.pixel_values(crop))
        self.stats["trunk"] += 1
        self._cache[key] = hidden
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return hidden, False

    def _decode(self, hidden, win, hw, fg, bg, box, mask_prompt):
        """Prompt encoder + fusion + decoder in window `win`; the probability map pasted on the image."""
        S = self.model.image_size
        points, labels, boxes = window_prompts(win, S, fg, bg, box)
        mp = None
        if mask_prompt is not None:
            m = torch.from_numpy(crop_window(np.asarray(mask_prompt, np.float32), win))[None, None]
            mp = F.interpolate(m, size=self.model.prompt_encoder.mask_hw, mode="bilinear", align_corners=False,
                               antialias=True)
        out = self.model.forward_from_trunk(hidden, points, labels, boxes, mp)
        self.stats["click"] += 1
        side = win[2] - win[0]
        prob_win = torch.sigmoid(out["mask_logits"].float())
        # upsample as ResizeMap.mask_from_model does (bilinear, pixel centres aligned), keeping the probabilities
        prob_win = F.interpolate(prob_win.cpu(), size=(side, side), mode="bilinear", align_corners=False)[0, 0].numpy()
        return out, paste_window(hw, win, prob_win)

    def _grown_window(self, win, mask, hw):
        """A window twice as large round the mask when the mask touches an edge of `win` that is not the
        image's edge (the object is larger than the window); None when it does not."""
        H, W = hw
        x0, y0, x1, y1 = win
        if not mask.any() or (x1 - x0) >= max(H, W):
            return None
        touch = ((x0 > 0 and mask[max(y0, 0):y1, x0].any()) or (x1 < W and mask[max(y0, 0):y1, x1 - 1].any())
                 or (y0 > 0 and mask[y0, max(x0, 0):x1].any()) or (y1 < H and mask[y1 - 1, max(x0, 0):x1].any()))
        if not touch:
            return None
        return focus_window(hw, mask=mask, expand=1.3, min_side=2 * (x1 - x0), min_frac=self.min_frac)

    @torch.no_grad()
    def predict(self, image2d: np.ndarray, image_key, fg_xy=(), bg_xy=(), box=None, mask_prompt=None,
                slice: int | None = None) -> dict:
        """Segment the region the prompts point at on a float [H, W, 3] image in [0, 1].

        Points are image (x, y) pixels, `box` half-open [x0, y0, x1, y1], `mask_prompt` a bool/[0, 1]
        (H, W) map (e.g. the previous slice's mask)."""
        t0 = time.perf_counter()
        image2d = np.asarray(image2d)
        if image2d.ndim == 2:
            image2d = np.repeat(image2d[..., None], 3, -1)
        H, W = image2d.shape[:2]
        fg = np.asarray(fg_xy, float).reshape(-1, 2)
        bg = np.asarray(bg_xy, float).reshape(-1, 2)
        box = None if box is None else [float(v) for v in box]
        if mask_prompt is not None and np.asarray(mask_prompt).shape != (H, W):
            raise ValueError(f"mask_prompt has shape {np.asarray(mask_prompt).shape}, the image {(H, W)}")
        stamp = self._stamp()
        skey = (image_key, slice, (H, W))
        pts_all = np.concatenate([fg, bg])
        win = self._windows.get(skey)
        if win is None or not _inside(win, pts_all, box, mask_prompt):
            win = focus_window((H, W), pts_all if len(fg) == 0 else fg, box, mask_prompt, self.expand,
                               self.min_side, self.min_frac)
            if not _inside(win, pts_all, box, mask_prompt):  # background clicks far away: cover them all
                win = focus_window((H, W), pts_all, box, mask_prompt, self.expand, self.min_side, self.min_frac)
        t1 = t_trunk = time.perf_counter()
        cached_first = None
        for attempt in range(self.max_grow + 1):  # grow the window while the mask runs past a window edge
            self._windows[skey] = win
            t_a = time.perf_counter()
            hidden, cached = self._trunk((image_key, slice, (H, W), win, stamp), image2d, win)
            t_trunk += 0.0 if cached else time.perf_counter() - t_a
            cached_first = cached if cached_first is None else cached_first
            out, prob = self._decode(hidden, win, (H, W), fg, bg, box, mask_prompt)
            grown = self._grown_window(win, prob > self.threshold, (H, W)) if attempt < self.max_grow else None
            if grown is None:
                break
            win = grown
        cached = cached_first
        t2 = time.perf_counter()
        return {
            "mask": prob > self.threshold, "prob": prob,
            "region_embedding": out["region_embedding"][0].float().cpu().numpy(),
            "global_embedding": out["global_embedding"][0].float().cpu().numpy(),
            "iou_pred": float(out["iou_pred"][0]), "window": tuple(int(v) for v in win), "cached": cached,
            "timings_ms": {"trunk": round((t_trunk - t1) * 1e3, 2),
                           "prompt_decode": round((t2 - t1 - (t_trunk - t1)) * 1e3, 2),
                           "total": round((t2 - t0) * 1e3, 2)},
        }

    def propagate_3d(self, volume_slices_fn, depth: int, start_slice: int, start_mask: np.ndarray, image_key,
                     min_area_frac: float = 0.15, max_growth: float = 3.0, z_range=None, out=None) -> np.ndarray:
        """From `start_mask` on `start_slice`, walk up and down; each slice is prompted with the previous
        slice's mask and its box. Stops when the area drops below `min_area_frac` of the start area, grows
        beyond `max_growth` times the previous area, or vanishes. Returns a (Z, H, W) bool mask."""
        start_mask = np.asarray(start_mask, bool)
        out = np.zeros((depth,) + start_mask.shape, bool) if out is None else out
        out[start_slice] |= start_mask
        a0 = start_mask.sum()
        if a0 == 0:
            return out
        lo, hi = (0, depth) if z_range is None else (max(0, z_range[0]), min(depth, z_range[1]))
        for step in (1, -1):
            prev, z = start_mask, start_slice + step
            while lo <= z < hi:
                res = self.predict(volume_slices_fn(z), image_key, box=mask_box(prev), mask_prompt=prev, slice=z)
                m = res["mask"]
                area = m.sum()
                if area == 0 or area < min_area_frac * a0 or area > max_growth * max(prev.sum(), 1):
                    break
                out[z] |= m
                prev, z = m, z + step
        return out

    def predict_3d(self, volume_slices_fn, depth: int, image_key, fg_xyz=(), bg_xyz=(), box=None, **kw) -> dict:
        """Clicks (x, y, z) and/or a box [x0, y0, x1, y1] or [x0, y0, z0, x1, y1, z1] -> dict(mask (Z, H, W), seeds).

        Every clicked slice is an anchor. Slices with foreground clicks (or, for a box alone, its middle
        slice) are segmented from their clicks; slices with only background clicks refine the mask the
        propagation brought there, with that mask as prompt. Each anchor propagates its mask until the
        region ends, and each slice takes its mask from the nearest anchor (ties: the lower slice), so a
        corrective click anywhere in the volume changes the slices around it."""
        fg = np.asarray(fg_xyz, float).reshape(-1, 3)
        bg = np.asarray(bg_xyz, float).reshape(-1, 3)
        box2d, zr = None, None
        if box is not None:
            box = [float(v) for v in box]
            box2d, zr = (box[:4], None) if len(box) == 4 else ([box[0], box[1], box[3], box[4]], (int(box[2]), int(box[5])))
        seeds = sorted({int(round(z)) for z in fg[:, 2]})
        if not seeds and box2d is not None:
            seeds = [(zr[0] + zr[1] - 1) // 2 if zr else depth // 2]
        if not seeds:
            raise ValueError("predict_3d needs at least one foreground click or a box")
        refine = sorted({int(round(z)) for z in bg[:, 2]} - set(seeds))
        for z in seeds + refine:
            if not 0 <= z < depth:
                raise ValueError(f"click on slice {z} is outside the volume of depth {depth}")
        on = lambda p, z: p[np.round(p[:, 2]).astype(int) == z, :2]  # noqa: E731
        in_box = lambda z: box2d if (box2d is not None and (zr is None or zr[0] <= z < zr[1])) else None  # noqa: E731
        anchors, first = {}, None
        for z in seeds:
            res = self.predict(volume_slices_fn(z), image_key, on(fg, z), on(bg, z), in_box(z), slice=z)
            first = first or res
            anchors[z] = res["mask"]
        out = self._propagate_anchors(volume_slices_fn, depth, image_key, anchors, zr, **kw)
        for z in refine:  # background-only slices: correct what propagation brought there
            if out[z].any():
                anchors[z] = self.predict(volume_slices_fn(z), image_key, (), on(bg, z), None, mask_prompt=out[z],
                                          slice=z)["mask"]
        if len(anchors) > len(seeds):
            out = self._propagate_anchors(volume_slices_fn, depth, image_key, anchors, zr, **kw)
        return {"mask": out, "seeds": seeds, "refined": sorted(set(anchors) - set(seeds)),
                "region_embedding": first["region_embedding"]}

    def _propagate_anchors(self, volume_slices_fn, depth, image_key, anchors: dict, zr=None, **kw) -> np.ndarray:
        """Propagate each anchor slice's mask through the slices nearer to it than to any other anchor."""
        zs = sorted(anchors)
        lo_all, hi_all = (0, depth) if zr is None else (max(0, zr[0]), min(depth, zr[1]))
        out = np.zeros((depth,) + next(iter(anchors.values())).shape, bool)
        for i, z in enumerate(zs):
            lo = lo_all if i == 0 else max(lo_all, (zs[i - 1] + z) // 2 + 1)
            hi = hi_all if i == len(zs) - 1 else min(hi_all, (z + zs[i + 1]) // 2 + 1)
            self.propagate_3d(volume_slices_fn, depth, z, anchors[z], image_key, z_range=(lo, hi), out=out, **kw)
        return out
