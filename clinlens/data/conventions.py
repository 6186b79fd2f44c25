"""The one owner of request conventions: IJK points, Slicer ROIs, the 2D `slice`, resize and orientation.

- Viewer points (`foreground`, `background`) are voxel indices `[i, j, k]` of the image as
  loaded: i = column (x, fastest), j = row (y), k = slice (z). Arrays are indexed `[k, j, i]`.
- Slicer's `roi` is `[i0, i1, j0, j1, k0, k1]`: interleaved min/max pairs that may be unsorted.
  It is normalised to sorted, half-open pairs per axis.
- 2D models get `slice: k` from Slicer; points of other slices are errors, not silently dropped.
- Pixel boxes (`boxes`, feedback) are `{"box": [x0, y0, x1, y1], "polarity": "positive" | "negative"}`
  on the 2D plane, half-open (x = column), `parse_box`.
- `ResizeMap` maps pixel coordinates to a model grid and masks back (pixel centres aligned).
- `OrientationMap` maps indices through a reorientation by way of physical space.

Every violation raises `RequestError` with a message a clinician can act on; the HTTP layer turns
it into a 4xx.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


class RequestError(ValueError):
    """A problem with the request itself (HTTP 4xx)."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


def number_option(request: dict, key: str, default, kind=float, lo=None, hi=None):
    """A numeric request option (viewers send strings too), or a RequestError naming it and its range."""
    value = request.get(key, default)
    try:
        x = kind(value)
    except (TypeError, ValueError):
        raise RequestError(f"'{key}' must be a number, got {value!r}") from None
    except OverflowError:  # int(inf)
        raise RequestError(f"'{key}' must be a finite number, got {value!r}") from None
    if not math.isfinite(x):
        raise RequestError(f"'{key}' must be a finite number, got {value!r}")
    if (lo is not None and x < lo) or (hi is not None and x > hi):
        raise RequestError(f"'{key}' must be in [{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}], got {x}")
    return x


def choice_option(request: dict, key: str, default, choices=None):
    """A choice option. Slicer sends the config's whole choice list back when it is left untouched, so
    a list means its first entry; with `choices`, any other value is a RequestError naming them."""
    value = request.get(key) or default
    if isinstance(value, list):
        value = value[0] if value else default
    if choices is not None and value not in choices:
        raise RequestError(f"'{key}' must be one of {list(choices)}, got {value!r}")
    return value


def name_list(value, field: str, allowed, what: str) -> list[str]:
    """A name or list of names (case and outer spaces ignored), each in `allowed` -> sorted unique
    lower-case names, or a RequestError naming the field and the unknown names."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise RequestError(f"'{field}' must be a list of {what} names, got {value!r}")
    out = [v.strip().lower() for v in value]
    bad = sorted(set(out) - set(allowed))
    if bad:
        raise RequestError(f"'{field}': unknown {what}(s) {bad}; known: {list(allowed)}")
    return sorted(set(out))


POLARITIES = ("positive", "negative")


def parse_box(entry, hw=None) -> dict:
    """`{"box": [x0, y0, x1, y1], "polarity": ...(, "slice": k)}` -> the same normalised (floats, polarity
    "positive" when left out), or a RequestError. `hw` = (H, W) of the plane bounds the box (None: not checked)."""
    if not isinstance(entry, dict) or "box" not in entry:
        raise RequestError(f'each box must be {{"box": [x0, y0, x1, y1], "polarity": "positive"|"negative"}}, got {entry!r}')
    pol = entry.get("polarity", "positive")
    if pol not in POLARITIES:
        raise RequestError(f"box polarity must be one of {POLARITIES}, got {pol!r}")
    b = entry["box"]
    if (not isinstance(b, (list, tuple)) or len(b) != 4
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in b)):
        raise RequestError(f"a box is 4 finite numbers [x0, y0, x1, y1] in pixels, got {b!r}")
    x0, y0, x1, y1 = (float(v) for v in b)
    if not (x0 < x1 and y0 < y1):
        raise RequestError(f"box {list(b)} is empty (need x0 < x1 and y0 < y1)")
    if hw is not None:
        h, w = hw
        if x0 < 0 or y0 < 0 or x1 > w or y1 > h:
            raise RequestError(f"box {list(b)} lies outside the image ({w} x {h} px)")
    out = {"box": [x0, y0, x1, y1], "polarity": pol}
    if "slice" in entry:
        z = entry["slice"]
        if not isinstance(z, int) or isinstance(z, bool) or z < 0:
            raise RequestError(f"box slice must be a non-negative integer, got {z!r}")
        out["slice"] = z
    return out


def ijk_to_index(point) -> tuple[int, ...]:
    """Viewer IJK -> numpy array index (reversed order)."""
    return tuple(int(v) for v in reversed(list(point)))


@dataclass
class Prompts:
    """Normalised prompts, all in IJK order of the image as loaded."""

    foreground: np.ndarray = field(default_factory=lambda: np.zeros((0, 3), int))
    background: np.ndarray = field(default_factory=lambda: np.zeros((0, 3), int))
    roi: np.ndarray | None = None  # (ndim, 2): sorted [start, stop) per axis i, j, k
    slice: int | None = None
    label: str | None = None

    @property
    def has_points(self) -> bool:
        return len(self.foreground) + len(self.background) > 0


def _points(raw, name: str, size_ijk: tuple[int, ...]) -> np.ndarray:
    nd = len(size_ijk)
    if raw is None or raw == []:
        return np.zeros((0, nd), int)
    if not isinstance(raw, (list, tuple)) or not all(isinstance(p, (list, tuple)) for p in raw):
        raise RequestError(f"'{name}' must be a list of [i, j, k] points, got {raw!r}")
    pts = []
    for p in raw:
        if len(p) not in (2, 3) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in p):
            raise RequestError(f"'{name}' point {p!r} is not [i, j] or [i, j, k] numbers")
        q = [int(round(v)) for v in p]
        if len(q) == 3 and nd == 2:
            if q[2] != 0:
                raise RequestError(f"'{name}' point {p!r} has slice {q[2]} but the image is 2D")
            q = q[:2]
        elif len(q) == 2 and nd == 3:
            raise RequestError(f"'{name}' point {p!r} needs three indices [i, j, k] for a 3D image")
        if any(v < 0 or v >= s for v, s in zip(q, size_ijk)):
            raise RequestError(f"'{name}' point {p!r} is outside the image of size {list(size_ijk)} (IJK order)")
        pts.append(q)
    return np.asarray(pts, int).reshape(-1, nd)


def normalize_roi(raw, size_ijk: tuple[int, ...]) -> np.ndarray | None:
    """Slicer's interleaved, possibly unsorted `[i0, i1, j0, j1(, k0, k1)]` -> sorted (ndim, 2), clipped.

    The pair is read as inclusive voxel bounds and returned half-open.
    """
    if raw is None or raw == [] or raw == {}:
        return None
    nd = len(size_ijk)
    vals = list(raw) if isinstance(raw, (list, tuple)) else None
    if vals is None or len(vals) not in (4, 6) or not all(isinstance(v, (int, float)) for v in vals):
        raise RequestError(f"'roi' must be [i0, i1, j0, j1] or [i0, i1, j0, j1, k0, k1], got {raw!r}")
    pairs = np.asarray(vals, float).reshape(-1, 2)
    if len(pairs) == 3 and nd == 2:
        if pairs[2].max() > 0:
            raise RequestError(f"'roi' {raw!r} spans slices but the image is 2D")
        pairs = pairs[:2]
    if len(pairs) == 2 and nd == 3:
        raise RequestError(f"'roi' {raw!r} gives two axes but the image is 3D")
    pairs = np.sort(np.round(pairs).astype(int), axis=1)
    pairs[:, 1] += 1  # inclusive -> half-open
    size = np.asarray(size_ijk)
    clipped = np.stack([np.clip(pairs[:, 0], 0, size), np.clip(pairs[:, 1], 0, size)], axis=1)
    if (clipped[:, 1] <= clipped[:, 0]).any():
        raise RequestError(f"'roi' {raw!r} does not overlap the image of size {list(size_ijk)} (IJK order)")
    extent = clipped[:, 1] - clipped[:, 0]
    in_plane = extent[:2]
    if (in_plane <= 1).any():
        raise RequestError(f"'roi' {raw!r} has zero area")
    return clipped


def parse_prompts(request: dict, size_ijk: tuple[int, ...], dimension: int = 2) -> Prompts:
    """Validate and normalise the viewer's prompts for a model of `dimension` (2 or 3)."""
    fg = _points(request.get("foreground"), "foreground", size_ijk)
    bg = _points(request.get("background"), "background", size_ijk)
    roi = normalize_roi(request.get("roi"), size_ijk)
    sl = request.get("slice")
    if sl is not None:
        if isinstance(sl, bool) or not isinstance(sl, (int, float, str)) or not str(sl).lstrip("-").isdigit():
            raise RequestError(f"'slice' must be an integer, got {sl!r}")
        sl = int(sl)
        depth = size_ijk[2] if len(size_ijk) == 3 else 1
        if not 0 <= sl < depth:
            raise RequestError(f"'slice' {sl} is out of range [0, {depth - 1}]")
    if dimension == 2 and len(size_ijk) == 3:
        ks = {int(k) for k in np.concatenate([fg, bg])[:, 2]}
        if sl is None and len(ks) == 1:
            sl = ks.pop()
        elif len(ks) > 1 or (ks and sl not in ks):
            raise RequestError(
                f"this is a 2D model: all points must lie on one slice (slice={sl}), got slices {sorted(ks)}"
            )
    label = request.get("label")
    return Prompts(foreground=fg, background=bg, roi=roi, slice=sl, label=label if isinstance(label, str) else None)


@dataclass(frozen=True)
class ResizeMap:
    """Pixel grid (H, W) of the image <-> model grid (S_h, S_w), pixel centres aligned."""

    src_hw: tuple[int, int]
    dst_hw: tuple[int, int]

    def points_to_model(self, xy: np.ndarray) -> np.ndarray:
        """(N, 2) points as (x=i, y=j) on the image -> float (x, y) on the model grid."""
        xy = np.asarray(xy, float).reshape(-1, 2)
        scale = np.array([self.dst_hw[1] / self.src_hw[1], self.dst_hw[0] / self.src_hw[0]])
        return (xy + 0.5) * scale - 0.5

    def points_from_model(self, xy: np.ndarray) -> np.ndarray:
        xy = np.asarray(xy, float).reshape(-1, 2)
        scale = np.array([self.src_hw[1] / self.dst_hw[1], self.src_hw[0] / self.dst_hw[0]])
        return (xy + 0.5) * scale - 0.5

    def mask_from_model(self, prob: np.ndarray, threshold: float = 0.5) -> np.ndarray:
        """A (S_h, S_w) probability map -> boolean (H, W) mask on the image grid."""
        import torch
        import torch.nn.functional as F

        t = torch.as_tensor(np.asarray(prob, np.float32))[None, None]
        up = F.interpolate(t, size=self.src_hw, mode="bilinear", align_corners=False)[0, 0].numpy()
        return up > threshold


class OrientationMap:
    """IJK indices of an image as loaded <-> IJK indices after reorienting it (e.g. to RAS).

    Goes through physical space, so any permutation or flip that DICOMOrient makes is covered.
    """

    def __init__(self, ref, target: str = "RAS"):
        import SimpleITK as sitk

        self.src = ref
        self.dst = sitk.DICOMOrient(ref, target)

    def to_target(self, ijk) -> tuple[int, ...]:
        phys = self.src.TransformIndexToPhysicalPoint([int(v) for v in ijk])
        return tuple(self.dst.TransformPhysicalPointToIndex(phys))

    def to_source(self, ijk) -> tuple[int, ...]:
        phys = self.dst.TransformIndexToPhysicalPoint([int(v) for v in ijk])
        return tuple(self.src.TransformPhysicalPointToIndex(phys))

    @property
    def image(self):
        return self.dst


def slice_2d(array: np.ndarray, k: int | None, is_rgb: bool = False) -> np.ndarray:
    """The 2D plane a 2D model sees: a 2D image itself, or axial slice k (array index [k]) of a volume."""
    spatial = array.ndim - (1 if is_rgb else 0)
    if spatial == 2:
        return array
    depth = array.shape[0]
    k = depth // 2 if k is None else int(k)
    if not 0 <= k < depth:
        raise RequestError(f"'slice' {k} is out of range [0, {depth - 1}]")
    return array[k]


def place_2d(mask2d: np.ndarray, spatial_shape: tuple[int, ...], k: int | None) -> np.ndarray:
    """The inverse of `slice_2d` for results: a 2D mask placed on slice k of a volume (or returned as is)."""
    if len(spatial_shape) == 2:
        return mask2d
    out = np.zeros(spatial_shape, mask2d.dtype)
    out[spatial_shape[0] // 2 if k is None else int(k)] = mask2d
    return out
