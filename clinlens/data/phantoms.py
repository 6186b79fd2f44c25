"""Deterministic synthetic medical images ("phantoms") with full ground truth.

clinlens trains its embedded default model, runs its tests and demos on these instead of real
patient data. Three families:

- ``chest``: chest X-ray-like 2D float32 image in [0, 1] (lungs, heart, ribs, clavicles,
  diaphragm domes, lung markings) with findings :data:`CHEST_FINDINGS`;
- ``derm``: dermoscopy-like RGB uint8 image of a pigmented lesion with the dermoscopic concepts
  :data:`DERM_CONCEPTS`;
- ``ct``: chest CT-like int16 HU volume [z, y, x] with 3D lesions :data:`CT_FINDINGS`.

Each :class:`Sample` carries masks, boxes, 0/1 concepts, a diagnosis, a free-text report with
natural negation, anatomy masks and pixel spacing. Everything is a pure function of the seed
(``np.random.default_rng(seed)``).

Conventions (project-wide): arrays in array order (2D ``[y, x]``, RGB ``[y, x, 3]``, 3D
``[z, y, x]``); boxes are half-open index ranges in (x, y[, z]) order: ``[x0, y0, x1, y1]`` or
``[x0, y0, z0, x1, y1, z1]``; spacing in (x, y[, z]) order, mm. Images are in radiological
display: image left = patient right. CT volumes use the DICOM LPS patient frame with identity
direction: x -> patient left, y -> posterior, z index 0 = most inferior slice.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi

CHEST_FINDINGS = ["nodule", "mass", "consolidation", "pleural effusion", "pneumothorax", "cardiomegaly"]
# Diagnosis rule (first match wins): "lung tumor" if mass or nodule; "pneumonia" if consolidation;
# "heart failure" if cardiomegaly or pleural effusion; "pneumothorax" if pneumothorax; else "normal".
CHEST_DIAGNOSES = ["normal", "pneumonia", "lung tumor", "heart failure", "pneumothorax"]
DERM_CONCEPTS = ["asymmetry", "irregular border", "pigment network", "dots and globules", "blue-white veil", "streaks"]
DERM_DIAGNOSES = ["nevus", "melanoma", "seborrheic keratosis"]
# Derm concepts that get a mask ("asymmetry" is a global shape property; "irregular border" is the border band).
DERM_SPATIAL = ["irregular border", "pigment network", "dots and globules", "blue-white veil", "streaks"]
CT_FINDINGS = ["lung nodule", "lung mass", "pleural effusion"]
FAMILIES = ("chest", "derm", "ct")

# Word stem the reports use for each finding/concept (for report parsing and tests).
REPORT_TERMS = {
    "nodule": "nodul", "mass": "mass", "consolidation": "consolidat", "pleural effusion": "effusion",
    "pneumothorax": "pneumothora", "cardiomegaly": "cardiomegaly", "asymmetry": "asymmetr",
    "irregular border": "irregular border", "pigment network": "pigment network",
    "dots and globules": "dots and globules", "blue-white veil": "blue-white veil", "streaks": "streak",
    "lung nodule": "nodul", "lung mass": "mass",
}
NEGATION_RE = re.compile(r"\b(no|not|without|absent|negative for|free of)\b", re.I)

# Probability that each derm concept is present, per diagnosis.
_DERM_P = {
    "melanoma": [0.85, 0.85, 0.35, 0.6, 0.65, 0.55],
    "nevus": [0.1, 0.1, 0.85, 0.35, 0.03, 0.08],
    "seborrheic keratosis": [0.3, 0.3, 0.08, 0.55, 0.05, 0.03],
}


@dataclass
class Sample:
    """One synthetic case with its ground truth (see module docstring for conventions)."""

    family: str
    image: np.ndarray
    masks: dict = field(default_factory=dict)
    boxes: dict = field(default_factory=dict)
    concepts: dict = field(default_factory=dict)
    diagnosis: str = ""
    report: str = ""
    anatomy: dict = field(default_factory=dict)
    spacing: tuple = ()
    meta: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- helpers
def mask_box(mask: np.ndarray) -> list[int]:
    """Half-open bounding box of a bool mask in (x, y[, z]) order; [] if empty."""
    if not mask.any():
        return []
    lo, hi = [], []
    for ax in range(mask.ndim):
        idx = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != ax)))
        lo.append(int(idx[0]))
        hi.append(int(idx[-1]) + 1)
    return lo[::-1] + hi[::-1]


def _field(rng, shape, sigma):
    """Smooth zero-mean, unit-std random field (low-res + linear upsampling for large sigma)."""
    f = max(1, int(sigma // 3))
    small = tuple(max(2, -(-s // f)) for s in shape)
    n = ndi.gaussian_filter(rng.standard_normal(small).astype(np.float32), sigma / f, mode="wrap")
    if f > 1:
        n = ndi.zoom(n, [s / m for s, m in zip(shape, small)], order=1, mode="nearest")
        n = n[tuple(slice(0, s) for s in shape)]
    n -= n.mean()
    return n / (n.std() + 1e-6)


def _ridges(rng, shape, sigma, width=0.12):
    """Curvy line network (zero crossings of a smooth field): vessel / network-like texture."""
    return np.exp(-((_field(rng, shape, sigma) / width) ** 2))


def _radial(rng, yy, xx, cy, cx, ry, rx, angle=0.0, lobular=0.0, rough=0.0, k1=0.0, spikes=0):
    """Star-shaped blob: returns normalised radius rho/r(theta) (<1 inside)."""
    c, s = np.cos(angle), np.sin(angle)
    dx, dy = xx - cx, yy - cy
    u, v = (dx * c + dy * s) / rx, (-dx * s + dy * c) / ry
    th = np.linspace(-np.pi, np.pi, 1025)            # r(theta) tabulated, then looked up per pixel
    r = np.ones_like(th)
    if k1:
        r += k1 * np.cos(th + rng.uniform(0, 2 * np.pi))
    for k in range(2, 5):
        r += lobular * rng.uniform(0.3, 1.0) / k * np.cos(k * th + rng.uniform(0, 2 * np.pi))
    for k in range(5, 17):
        r += rough * rng.uniform(0.2, 1.0) / np.sqrt(k - 3) * np.cos(k * th + rng.uniform(0, 2 * np.pi))
    for t in rng.uniform(-np.pi, np.pi, spikes):
        d = np.angle(np.exp(1j * (th - t)))
        r += rng.uniform(0.25, 0.6) * np.exp(-((d / 0.06) ** 2))
    idx = ((np.arctan2(v, u) + np.pi) * (1024 / (2 * np.pi))).astype(np.int32)
    return np.hypot(u, v) / np.maximum(r, 0.2)[idx]


def _pick(rng, mask, min_dist=0.0, dist=None):
    """Random (y, x[, z...]) index inside mask, preferring points at least min_dist from its edge."""
    if dist is not None and min_dist > 0:
        ok = dist >= min_dist
        if ok.any():
            mask = ok
    idx = np.flatnonzero(mask)
    return np.unravel_index(idx[rng.integers(len(idx))], mask.shape)


def _side_words(side):
    return "right" if side == 0 else "left"


def _lobe(side, frac):
    """Lobe name from side (0 right, 1 left) and cranio-caudal fraction (0 apex .. 1 base)."""
    if frac < 0.4:
        return "upper lobe"
    if side == 0:
        return "middle lobe" if frac < 0.62 else "lower lobe"
    return "lingula" if frac < 0.55 else "lower lobe"


def _neg(rng, term):
    """A negated sentence for a finding, varied phrasing."""
    t = rng.integers(5)
    if t == 0:
        return f"No {term}."
    if t == 1:
        return f"No evidence of {term}."
    if t == 2:
        return f"{term[0].upper() + term[1:]} is absent."
    if t == 3:
        return f"Negative for {term}."
    return f"Lungs are otherwise unremarkable without {term}."


# Tiny 5x3 bitmap font for the shortcut tag.
_FONT = {
    "A": ".#.#.#####.##.#", "P": "##.#.###.#..#..", "O": "####.##.##.####", "R": "##.#.###.#.##.#",
    "T": "###.#..#..#..#.", "L": "#..#..#..#..###", "E": "####..##.#..###", "S": "####..###..####",
    "U": "#.##.##.##.####", "I": "###.#..#..#.###",
}


def _glyphs(text, cell):
    """Bool bitmap of text in the 5x3 font, each font cell = cell x cell pixels."""
    cols = []
    for ch in text:
        cols.append(np.array([c == "#" for c in _FONT[ch]]).reshape(5, 3))
        cols.append(np.zeros((5, 1), bool))
    bm = np.concatenate(cols[:-1], axis=1)
    return np.kron(bm, np.ones((cell, cell), bool))


# ----------------------------------------------------------------------------- chest
def chest_diagnosis(findings) -> str:
    """Deterministic chest diagnosis rule (see CHEST_DIAGNOSES comment)."""
    f = set(findings)
    if f & {"mass", "nodule"}:
        return "lung tumor"
    if "consolidation" in f:
        return "pneumonia"
    if f & {"cardiomegaly", "pleural effusion"}:
        return "heart failure"
    if "pneumothorax" in f:
        return "pneumothorax"
    return "normal"


def _tag_slot(rng, text: str, cell: int, keep_out: np.ndarray):
    """A corner slot clear of `keep_out` for a glyph tag of `text` (or its first letter when it does
    not fit): (text drawn, tag as float32 0/1 with a one-cell margin, slices)."""
    S = keep_out.shape[0]
    corners = rng.permutation(4)
    dy0, dx0 = (int(rng.integers(2, max(3, int(0.04 * S)))) for _ in range(2))
    for txt in (text, text[0]):
        tag = np.pad(_glyphs(txt, cell).astype(np.float32), cell)
        h, w = tag.shape
        for c in corners:
            y0 = dy0 if c < 2 else S - dy0 - h
            x0 = dx0 if c % 2 == 0 else S - dx0 - w
            sl = (slice(y0, y0 + h), slice(x0, x0 + w))
            if not keep_out[sl].any():
                return txt, tag, sl
    raise RuntimeError("no room for the shortcut tag")


def make_chest(seed: int, size: int = 256, findings: list[str] | None = None, shortcut: bool | None = None,
               shortcut_corr: float = 0.0) -> Sample:
    """Chest X-ray-like radiograph (PA view, image left = patient right)."""
    rng = np.random.default_rng(seed)
    S = int(size)
    if findings is None:
        if rng.random() < 0.25:
            findings = []
        else:
            k = rng.choice([1, 2, 3], p=[0.6, 0.3, 0.1])
            findings = list(rng.choice(CHEST_FINDINGS, k, replace=False))
    bad = set(findings) - set(CHEST_FINDINGS)
    if bad:
        raise ValueError(f"unknown chest findings {sorted(bad)}; choose from {CHEST_FINDINGS}")
    findings = [f for f in CHEST_FINDINGS if f in findings]
    diagnosis = chest_diagnosis(findings)
    px = 1.0 / S
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float32) * px

    # --- anatomy (normalised coordinates)
    cx0 = 0.5 + rng.uniform(-0.03, 0.03)
    tw = rng.uniform(0.34, 0.40)                      # thorax half width
    top = rng.uniform(0.08, 0.14)
    base = rng.uniform(0.78, 0.85)                    # diaphragm level (left dome)
    body = _radial(rng, yy, xx, 0.64, cx0, 0.78, tw + rng.uniform(0.06, 0.1), lobular=0.02) < 1
    ctr = rng.uniform(0.58, 0.68) if "cardiomegaly" in findings else rng.uniform(0.36, 0.45)
    hrx = ctr * tw
    hcx = cx0 + rng.uniform(0.04, 0.07)
    hcy = base - rng.uniform(0.12, 0.16)
    heart_r = _radial(rng, yy, xx, hcy, hcx, hrx * rng.uniform(0.62, 0.75), hrx, angle=rng.uniform(-0.35, -0.1),
                      lobular=0.04)
    heart = (heart_r < 1) & (yy < base + 0.02)
    md = rng.uniform(0.045, 0.065)                   # mediastinum half width
    medi = (np.abs(xx - cx0 - 0.01) < md) & (yy < hcy)
    lungs_side, domes = [], []
    for side, sgn in ((0, -1), (1, 1)):
        lw = rng.uniform(0.14, 0.165)
        lcx = cx0 + sgn * (tw - lw - rng.uniform(0.0, 0.02))
        b = base - (0.025 if side == 0 else 0.0) + rng.uniform(-0.01, 0.01)
        dh = rng.uniform(0.05, 0.08)
        dome = b - dh * np.clip(1 - ((xx - lcx - sgn * 0.02) / (lw * 1.25)) ** 2, 0, 1)
        ry = (b + 0.04 - top) / 2
        shape = _radial(rng, yy, xx, top + ry, lcx, ry, lw, lobular=0.03, rough=0.004)
        lung = (shape < 1) & (yy < dome) & (sgn * (xx - cx0) > md * 0.6) & ~heart & ~medi
        lungs_side.append(lung)
        domes.append(dome)
    lungs = lungs_side[0] | lungs_side[1]
    sigma_edge = 1.2 * S / 256

    dens = np.where(body, 0.42, 0.04).astype(np.float32)
    below = body & (yy > np.minimum(domes[0], domes[1])) & ~lungs
    dens[below] = 0.58
    dens[medi | heart] = 0.62
    dens[lungs] = 0.17
    dens = ndi.gaussian_filter(dens, sigma_edge)
    # lung markings: vessel-like ridges, stronger towards the hila
    hil = np.exp(-(((xx - cx0) / 0.22) ** 2 + ((yy - 0.45) / 0.3) ** 2))
    marks = ndi.gaussian_filter(_ridges(rng, (S, S), 3.0 * S / 256, 0.25), 0.8 * S / 256) * (0.03 + 0.1 * hil)
    marks += 0.02 * _field(rng, (S, S), 6 * S / 256)
    lung_soft = ndi.gaussian_filter(lungs.astype(np.float32), sigma_edge)
    # spine faintly through the mediastinum
    spine = np.exp(-(((xx - cx0) / 0.03) ** 4)) * (0.04 + 0.02 * (np.sin(yy * 70) > 0.6))
    dens += spine * ndi.gaussian_filter((medi | heart | below).astype(np.float32), sigma_edge)

    masks, info = {}, {}
    dist = [ndi.distance_transform_edt(m) * px for m in lungs_side]
    sides = list(rng.permutation(2))
    ptx_region = np.zeros((S, S), bool)
    add = np.zeros((S, S), np.float32)
    for f in findings:
        side = int(rng.integers(2))
        if f in ("pleural effusion", "pneumothorax") and {"pleural effusion", "pneumothorax"} <= set(findings):
            side = int(sides[0] if f == "pleural effusion" else sides[1])
        lung = lungs_side[side]
        rows = np.flatnonzero(lung.any(1))
        ltop, lbot = rows[0] * px, rows[-1] * px
        if f in ("nodule", "mass"):
            r = rng.uniform(0.011, 0.022) if f == "nodule" else rng.uniform(0.045, 0.08)
            cy, cx = (np.array(_pick(rng, lung, r * 0.9, dist[side])) * px)
            rr = _radial(rng, yy, xx, cy, cx, r * rng.uniform(0.8, 1.1), r, angle=rng.uniform(0, np.pi),
                         lobular=0.05 if f == "nodule" else 0.22, rough=0.0 if f == "nodule" else 0.07,
                         spikes=0 if f == "nodule" else int(rng.integers(0, 6)))
            m = (rr < 1) & lung
            add += np.clip(1 - rr, 0, 1) ** 0.4 * rng.uniform(0.2, 0.32) * m
        elif f == "consolidation":
            r = rng.uniform(0.06, 0.1)
            cy, cx = np.array(_pick(rng, lung, r * 0.5, dist[side])) * px
            rr = _radial(rng, yy, xx, cy, cx, r * rng.uniform(0.7, 1.2), r, lobular=0.3, rough=0.05)
            patchy = _field(rng, (S, S), 5 * S / 256) > -0.6
            m = ndi.binary_closing((rr < 1) & patchy & lung, iterations=2) & lung
            m = ndi.binary_opening(m, iterations=1) if m.sum() > 50 else m
            haze = ndi.gaussian_filter(m.astype(np.float32), 3 * S / 256)
            bron = _ridges(rng, (S, S), 2.0 * S / 256, 0.15) * (haze > 0.6)      # air bronchograms
            add += haze * rng.uniform(0.16, 0.28) - 0.025 * bron
        elif f == "pleural effusion":
            h = rng.uniform(0.05, 0.12)
            sgn = -1 if side == 0 else 1
            cols = np.flatnonzero(lung.any(0)) * px
            lat = np.clip(sgn * (xx - cx0) / (cols[-1] - cols[0] + 1e-6), 0, 1)
            men = lbot - h - 1.2 * h * lat ** 2                           # meniscus rises laterally
            m = lung & (yy > men)
            grad = np.clip((yy - men) / 0.02, 0, 1)
            add += ndi.gaussian_filter((m * grad).astype(np.float32), 1.5 * S / 256) * rng.uniform(0.3, 0.38)
            info[f] = ("small" if h < 0.075 else "moderate") if rng.random() < 0.7 else ""
        elif f == "pneumothorax":
            hy, hx = 0.45, cx0 + (-1 if side == 0 else 1) * (md + 0.03)
            k = rng.uniform(0.65, 0.8)
            yi = np.clip(np.round((hy + (yy - hy) / k) * S), 0, S - 1).astype(int)
            xi = np.clip(np.round((hx + (xx - hx) / k) * S), 0, S - 1).astype(int)
            collapsed = lung[yi, xi]
            m = lung & ~collapsed & (yy < ltop + 0.65 * (lbot - ltop))
            m = ndi.binary_opening(m, iterations=1)
            ptx_region |= m
            line = collapsed & ndi.binary_dilation(m, iterations=max(1, S // 256))
            add += ndi.gaussian_filter(line.astype(np.float32), 0.6 * S / 256) * 0.18
            add -= ndi.gaussian_filter(m.astype(np.float32), 1.0 * S / 256) * 0.09
        elif f == "cardiomegaly":
            m = heart.copy()
        masks[f] = m
        if f != "cardiomegaly" and m.any():
            ys = np.flatnonzero(m.any(1)).mean() * px
            info.setdefault("loc", {})[f] = (side, (ys - ltop) / max(lbot - ltop, 1e-6))
        info.setdefault("size", {})[f] = 2 * np.sqrt(m.sum() / np.pi)
    marks = np.where(ptx_region, 0.0, marks)
    img = dens + marks * lung_soft + add

    # ribs (posterior arcs) and clavicles overlie everything
    bones = np.zeros((S, S), np.float32)
    n_ribs = 9
    dy = (base - top) / n_ribs * rng.uniform(0.95, 1.1)
    for sgn in (-1, 1):
        d = np.clip(sgn * (xx[0] - cx0) / tw, 0, 1.2)
        on = ((d > 0.08) & (d < 1.05)).astype(np.float32)
        for k in range(n_ribs):
            y0 = top - 0.02 + k * dy + rng.uniform(-0.006, 0.006)
            curve = y0 - 0.045 * d + 0.16 * d ** 2.2 + 0.03 * k / n_ribs * d      # posterior arc
            t = rng.uniform(0.009, 0.013)
            r0, r1 = max(int((curve.min() - 3 * t) * S), 0), min(int((curve.max() + 3 * t) * S) + 1, S)
            if r1 <= r0:
                continue
            off = np.abs(yy[r0:r1] - curve[None, :]) / t
            bones[r0:r1] += (np.exp(-off ** 6) * 0.07 + 0.035 * np.exp(-((off - 0.8) / 0.3) ** 2)) * on
        ccurve = top + 0.01 - 0.08 * d + 0.03 * d ** 2
        r0, r1 = max(int((ccurve.min() - 0.05) * S), 0), int((ccurve.max() + 0.05) * S) + 1
        bones[r0:r1] += np.exp(-(((yy[r0:r1] - ccurve[None, :]) / 0.013) ** 4)) * ((d > 0.1) & (d < 0.85)) * 0.14
    img += bones * body * np.where(below, 0.3, 1.0)

    # shortcut tag: text-like glyph block in a corner, clear of lungs, heart and findings
    if shortcut is None:
        if shortcut_corr > 0 and rng.random() < shortcut_corr:
            shortcut = diagnosis != "normal"
        else:
            shortcut = bool(rng.random() < 0.5)
    anatomy = {"lungs": lungs, "heart": heart}
    hb, lb = mask_box(heart), mask_box(lungs)
    meta = {"seed": seed, "shortcut": bool(shortcut), "ctr": (hb[2] - hb[0]) / (lb[2] - lb[0])}  # cardiothoracic ratio
    if shortcut:
        text = ["AP", "PORT", "R", "L", "ER", "SUPI"][rng.integers(6)]
        cell = max(2, int(round(S / 110)))
        keep_out = lungs | heart
        for m in masks.values():
            keep_out |= m
        text, tag, sl = _tag_slot(rng, text, cell, keep_out)
        img[sl] = 0.06 + 0.9 * tag
        marker = np.zeros((S, S), bool)
        marker[sl] = True
        anatomy["marker"] = marker
        meta["shortcut_text"] = text
        meta["shortcut_box"] = mask_box(marker)
        for k in masks:
            masks[k] &= ~marker

    # acquisition: blur, contrast/gamma, noise
    img = ndi.gaussian_filter(img, rng.uniform(0.5, 1.0) * S / 256)
    img = np.clip(img * rng.uniform(0.9, 1.1) + rng.uniform(-0.04, 0.04), 0, 1) ** rng.uniform(0.8, 1.25)
    img = img + rng.normal(0, rng.uniform(0.012, 0.03), img.shape) + 0.02 * _field(rng, (S, S), S / 4)
    img = np.clip(img, 0, 1).astype(np.float32)

    sp = float(rng.uniform(380, 430) / S)
    report = _chest_report(rng, findings, info, sp)
    concepts = {f: int(f in findings) for f in CHEST_FINDINGS}
    return Sample("chest", img, masks, {k: mask_box(v) for k, v in masks.items()}, concepts, diagnosis,
                  report, anatomy, (sp, sp), meta)


def _chest_report(rng, findings, info, sp):
    sents = []
    loc = info.get("loc", {})
    size = info.get("size", {})

    def where(f):
        side, frac = loc[f]
        return f"{_side_words(side)} {_lobe(side, frac)}"

    for f in findings:
        if f == "nodule":
            d = size[f] * sp
            sents.append([f"A {d:.0f} mm nodule in the {where(f)}.", f"Small nodular opacity in the {where(f)}.",
                          f"Well-defined {d:.0f} mm pulmonary nodule, {where(f)}."][rng.integers(3)])
        elif f == "mass":
            d = size[f] * sp / 10
            sents.append([f"{d:.1f} cm mass in the {where(f)}.", f"Large irregular mass in the {where(f)}.",
                          f"Lobulated {d:.1f} cm mass projecting over the {where(f)}."][rng.integers(3)])
        elif f == "consolidation":
            w = where(f)
            sents.append([f"{w[0].upper() + w[1:]} consolidation.", f"Patchy consolidation in the {w}.",
                          f"Airspace consolidation in the {w} with air bronchograms."][rng.integers(3)])
        elif f == "pleural effusion":
            side = _side_words(loc[f][0])
            adj = info.get(f, "")
            sents.append([f"{(adj + ' ' + side).strip().capitalize()} pleural effusion.",
                          f"Blunting of the {side} costophrenic angle consistent with pleural effusion.",
                          f"Meniscus at the {side} lung base in keeping with a {adj + ' ' if adj else ''}pleural "
                          f"effusion."][rng.integers(3)])
        elif f == "pneumothorax":
            side = _side_words(loc[f][0])
            sents.append([f"{side.capitalize()} apical pneumothorax.",
                          f"{side.capitalize()} pneumothorax with a visible visceral pleural line.",
                          f"There is a {side} pneumothorax."][rng.integers(3)])
        elif f == "cardiomegaly":
            sents.append(["Cardiomegaly.", "The heart is enlarged, consistent with cardiomegaly.",
                          "Enlarged cardiac silhouette (cardiomegaly)."][rng.integers(3)])
    for f in CHEST_FINDINGS:
        if f in findings or rng.random() > 0.6:
            continue
        if f == "cardiomegaly" and rng.random() < 0.5:
            sents.append(["Heart size is normal.", "Normal cardiac silhouette."][rng.integers(2)])
        else:
            sents.append(_neg(rng, {"nodule": "pulmonary nodule", "consolidation": "focal consolidation"}.get(f, f)))
    if not findings:
        sents.insert(0, ["Lungs are clear.", "Clear lungs.", "No acute cardiopulmonary abnormality."][rng.integers(3)])
    dx = chest_diagnosis(findings)
    sents.append("Impression: normal chest radiograph." if dx == "normal" else f"Impression: {dx}.")
    return " ".join(sents)


# ----------------------------------------------------------------------------- derm
def make_derm(seed: int, size: int = 256, diagnosis: str | None = None, shortcut: bool | None = None) -> Sample:
    """Dermoscopy-like RGB image of a pigmented skin lesion.

    ``shortcut=True`` stamps a text-label marker (dark glyphs on a pale sticker) in a corner clear of the
    lesion and its concept masks, after everything else is drawn and from its own random stream: the image
    is the default one except inside ``meta["shortcut_box"]`` (``anatomy["marker"]``). The default
    (``None``/``False``) draws no marker and consumes no random numbers for it.
    """
    rng = np.random.default_rng(seed)
    S = int(size)
    if diagnosis is None:
        diagnosis = DERM_DIAGNOSES[rng.integers(3)]
    if diagnosis not in DERM_DIAGNOSES:
        raise ValueError(f"unknown derm diagnosis {diagnosis!r}; choose from {DERM_DIAGNOSES}")
    present = [c for c, p in zip(DERM_CONCEPTS, _DERM_P[diagnosis]) if rng.random() < p]
    px = 1.0 / S
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float32) * px
    sc = S / 256

    # skin
    tone = np.array([[236, 196, 178], [222, 172, 146], [200, 150, 118], [240, 205, 190]][rng.integers(4)], np.float32)
    tone += rng.uniform(-10, 10, 3)
    img = np.broadcast_to(tone, (S, S, 3)).copy()
    img += (10 * _field(rng, (S, S), 30 * sc) + 3 * _field(rng, (S, S), 1.5 * sc))[..., None]
    for c in range(3):
        img[..., c] += 3 * _field(rng, (S, S), 25 * sc)
    img[..., 0] += 10 * _field(rng, (S, S), 12 * sc).clip(0)            # erythema patches
    img *= (1 - 0.25 * (np.hypot(yy - 0.5, xx - 0.5) / 0.7) ** 2)[..., None]

    # lesion shape
    asym, irr = "asymmetry" in present, "irregular border" in present
    R = rng.uniform(0.16, 0.28)
    cy, cx = 0.5 + rng.uniform(-0.06, 0.06, 2)
    rr = _radial(rng, yy, xx, cy, cx, R * rng.uniform(0.75, 1.0), R, angle=rng.uniform(0, np.pi),
                 k1=rng.uniform(0.22, 0.32) if asym else 0.0, lobular=rng.uniform(0.25, 0.4) if asym else 0.02,
                 rough=rng.uniform(0.12, 0.18) if irr else 0.006)
    if irr:
        rr = rr + 0.07 * _field(rng, (S, S), 2.5 * sc)
    lesion = rr < 1
    lesion = ndi.binary_fill_holes(lesion)
    lab, n = ndi.label(lesion)
    if n > 1:
        lesion = lab == (np.argmax(np.bincount(lab.ravel())[1:]) + 1)
    prof = np.clip(1 - rr, 0, 1)

    # pigment
    base = {"melanoma": [95, 58, 42], "nevus": [140, 88, 58], "seborrheic keratosis": [170, 128, 92]}[diagnosis]
    col = np.array(base, np.float32) + rng.uniform(-12, 12, 3)
    alpha = np.clip(prof / rng.uniform(0.15, 0.35), 0, 1) * rng.uniform(0.75, 0.95)
    alpha = ndi.gaussian_filter(alpha * lesion, (1.5 if irr else 0.8) * sc)
    shade = 1 + 0.25 * _field(rng, (S, S), 10 * sc) * (0.6 if diagnosis == "melanoma" else 0.3)
    lcol = col[None, None, :] * shade[..., None]
    if diagnosis == "melanoma":   # variegated colours: dark brown/black patches
        dark = np.clip(_field(rng, (S, S), 8 * sc) - 0.3, 0, 1)[..., None]
        lcol = lcol * (1 - 0.6 * dark)
    img = img * (1 - alpha[..., None]) + lcol * alpha[..., None]
    if diagnosis == "seborrheic keratosis":   # waxy cerebriform fissures + milia-like cysts
        fis = ndi.gaussian_filter(_ridges(rng, (S, S), 6 * sc, 0.35), 1.5 * sc) * lesion
        img *= (1 - 0.18 * fis)[..., None]
        img += (12 * np.clip(_field(rng, (S, S), 4 * sc), 0, None) * lesion)[..., None]   # waxy sheen
        for _ in range(int(rng.integers(2, 7))):
            y, x = _pick(rng, lesion)
            img += 60 * np.exp(-(((yy - y * px) ** 2 + (xx - x * px) ** 2) / (2 * (0.006) ** 2)))[..., None]

    masks = {"lesion": lesion}
    inner = ndi.binary_erosion(lesion, iterations=max(1, int(3 * sc)))
    if irr:
        k = max(1, int(4 * sc))
        masks["irregular border"] = ndi.binary_dilation(lesion, iterations=k) & ~ndi.binary_erosion(lesion, iterations=k)
    if "pigment network" in present:
        cell = rng.uniform(6, 10) * sc                          # honeycomb: Voronoi cell borders
        seeds = np.zeros((S, S), bool)
        n = int(S * S / cell ** 2)
        seeds[rng.integers(0, S, n), rng.integers(0, S, n)] = True
        near = ndi.distance_transform_edt(~seeds, return_distances=False, return_indices=True)
        lab = near[0] * S + near[1]
        edge = (lab != np.roll(lab, 1, 0)) | (lab != np.roll(lab, 1, 1))
        lines = np.clip(ndi.gaussian_filter(edge.astype(np.float32), 0.8 * sc) * 2.2, 0, 1)
        region = inner.copy()
        if diagnosis == "melanoma" or rng.random() < 0.3:
            region &= _radial(rng, yy, xx, cy, cx, R * 0.9, R * 0.9, lobular=0.4) < 1
            region = region if region.sum() > 0.15 * lesion.sum() else inner
        soft = ndi.gaussian_filter(region.astype(np.float32), 2 * sc)
        img *= (1 - rng.uniform(0.35, 0.5) * lines * soft)[..., None]
        masks["pigment network"] = region
    if "dots and globules" in present:
        dots = np.zeros((S, S), bool)
        cand = inner if inner.any() else lesion
        rad_map = np.zeros((S, S), np.float32)
        for _ in range(int(rng.integers(8, 26))):
            y, x = _pick(rng, cand)
            r = rng.uniform(1.2, 3.5) * sc
            d2 = (yy * S - y) ** 2 + (xx * S - x) ** 2
            rad_map = np.maximum(rad_map, np.clip(1 - d2 / r ** 2, 0, 1))
            dots |= d2 <= (r + 1.5) ** 2
        dcol = np.array([45, 28, 22], np.float32) + rng.uniform(-8, 8, 3)
        a = (rad_map ** 0.5 * rng.uniform(0.7, 0.95))[..., None]
        img = img * (1 - a) + dcol * a
        masks["dots and globules"] = dots & lesion
    if "blue-white veil" in present:
        vy, vx = np.array(_pick(rng, inner if inner.any() else lesion)) * px
        vr = _radial(rng, yy, xx, vy, vx, R * rng.uniform(0.3, 0.55), R * rng.uniform(0.3, 0.55), lobular=0.3,
                     rough=0.05)
        veil = (vr < 1) & lesion
        a = ndi.gaussian_filter(veil.astype(np.float32), 3 * sc) * rng.uniform(0.55, 0.75)
        vcol = np.array([118, 135, 170], np.float32) + rng.uniform(-10, 10, 3)
        img = img * (1 - a[..., None]) + (vcol + 25 * _field(rng, (S, S), 4 * sc)[..., None]) * a[..., None]
        masks["blue-white veil"] = veil
    if "streaks" in present:
        from skimage.draw import line_aa
        st = np.zeros((S, S), np.float32)
        sector = rng.uniform(-np.pi, np.pi)
        width = rng.uniform(1.0, 2 * np.pi) if diagnosis != "melanoma" else rng.uniform(0.8, 3.5)
        edge = lesion & ~inner
        ey, ex = np.nonzero(edge)
        ang = np.arctan2(ey * px - cy, ex * px - cx)
        ok = np.abs(np.angle(np.exp(1j * (ang - sector)))) < width / 2
        ey, ex, ang = (ey[ok], ex[ok], ang[ok]) if ok.sum() > 5 else (ey, ex, ang)
        for i in rng.choice(len(ey), size=min(len(ey), int(rng.integers(8, 20))), replace=False):
            L = rng.uniform(0.025, 0.06) * S
            y0, x0 = ey[i] - 0.5 * L * np.sin(ang[i]), ex[i] - 0.5 * L * np.cos(ang[i])
            y1, x1 = ey[i] + L * np.sin(ang[i]), ex[i] + L * np.cos(ang[i])
            r, c, v = line_aa(int(y0), int(x0), int(np.clip(y1, 0, S - 1)), int(np.clip(x1, 0, S - 1)))
            ok = (r >= 0) & (r < S) & (c >= 0) & (c < S)
            np.maximum.at(st, (r[ok], c[ok]), v[ok])
        st = ndi.grey_dilation(st, size=max(2, int(2 * sc)))
        a = (st * 0.85)[..., None]
        img = img * (1 - a) + np.array([60, 35, 25], np.float32) * a
        masks["streaks"] = ndi.binary_dilation(st > 0.3, iterations=max(1, int(sc)))
    # hair (confounder, not a concept)
    if rng.random() < 0.4:
        from skimage.draw import bezier_curve
        hair = np.zeros((S, S), np.float32)
        for _ in range(int(rng.integers(1, 5))):
            p = rng.integers(0, S, 6)
            r, c = bezier_curve(*[int(v) for v in p], weight=rng.uniform(0.5, 2), shape=(S, S))
            hair[r, c] = 1
        hair = ndi.gaussian_filter(ndi.grey_dilation(hair, size=max(1, int(1.5 * sc))), 0.6 * sc)
        img *= (1 - 0.7 * np.clip(hair * 2, 0, 1))[..., None]
    img = ndi.gaussian_filter(img, (0.7 * sc, 0.7 * sc, 0)) + rng.normal(0, 3, img.shape)
    img = np.clip(img, 0, 255).astype(np.uint8)
    meta, anatomy = {"seed": seed, "shortcut": False}, {}
    if shortcut:
        img, marker, text = _derm_marker(seed, img, masks)
        anatomy["marker"] = marker
        meta.update(shortcut=True, shortcut_text=text, shortcut_box=mask_box(marker))

    for k in list(masks):
        if not masks[k].any():   # a concept too small to survive: drop it consistently
            masks.pop(k)
            if k in present:
                present.remove(k)
    concepts = {c: int(c in present) for c in DERM_CONCEPTS}
    report = _derm_report(rng, present, diagnosis)
    sp = float(rng.uniform(18, 24) / S)
    return Sample("derm", img, masks, {k: mask_box(v) for k, v in masks.items()}, concepts, diagnosis, report,
                  anatomy, (sp, sp), meta)


def _derm_marker(seed: int, img: np.ndarray, masks: dict):
    """Stamp a text label in a corner clear of the (dilated) lesion masks; own random stream."""
    rng = np.random.default_rng([int(seed), 0x5C])
    S = img.shape[0]
    keep_out = np.zeros((S, S), bool)
    for m in masks.values():
        keep_out |= m
    keep_out = ndi.binary_dilation(keep_out, iterations=max(1, S // 64))
    text = ["SITE", "PT", "TOP", "L", "R"][rng.integers(5)]
    cell = max(2, int(round(S / 110)))
    txt, tag, sl = _tag_slot(rng, text, cell, keep_out)
    h, w = tag.shape
    paper = np.array([244, 242, 236], np.float32) + rng.uniform(-6, 6, 3)
    ink = np.array([30, 28, 70], np.float32) + rng.uniform(-10, 10, 3)
    patch = np.where(tag[..., None] > 0, ink, paper) + rng.normal(0, 3, (h, w, 3))
    out = img.copy()
    out[sl] = np.clip(patch, 0, 255).astype(np.uint8)
    marker = np.zeros((S, S), bool)
    marker[sl] = True
    return out, marker, txt


def _derm_report(rng, present, diagnosis):
    shape = "Asymmetric" if "asymmetry" in present else ["Symmetric", "Round, symmetric"][rng.integers(2)]
    feats = [c for c in DERM_CONCEPTS[1:] if c in present]
    s = f"{shape} {'pigmented ' if rng.random() < 0.5 else ''}lesion"
    if feats:
        s += " with " + (", ".join(feats[:-1]) + " and " + feats[-1] if len(feats) > 1 else feats[0])
    if "irregular border" not in present:
        s += (" and" if feats else " with") + [" a smooth, well-defined outline", " sharply demarcated margins"][
            rng.integers(2)] if rng.random() < 0.7 else ""
    sents = [s + "."]
    absent = [c for c in DERM_CONCEPTS[1:] if c not in present]
    neg = [c for c in absent if rng.random() < 0.6 and c != "irregular border"]
    if neg:
        j = " or ".join(neg)
        sents.append([f"No {j}.", f"There is no {j}.", f"Negative for {j}.", f"Without {j}."][rng.integers(4)])
    sents.append([f"Consistent with {diagnosis}.", f"Impression: {diagnosis}.",
                  f"Dermoscopic features favour {diagnosis}."][rng.integers(3)])
    return " ".join(sents)


# ----------------------------------------------------------------------------- CT
def make_ct(seed: int, shape=(48, 128, 128), findings: list[str] | None = None) -> Sample:
    """Chest CT-like int16 HU volume [z, y, x] (LPS, identity direction, z index 0 = inferior)."""
    rng = np.random.default_rng(seed)
    Z, Y, X = (int(s) for s in shape)
    if findings is None:
        if rng.random() < 0.2:
            findings = []
        else:
            k = rng.choice([1, 2], p=[0.7, 0.3])
            findings = list(rng.choice(CT_FINDINGS, k, replace=False, p=[0.45, 0.35, 0.2]))
    bad = set(findings) - set(CT_FINDINGS)
    if bad:
        raise ValueError(f"unknown CT findings {sorted(bad)}; choose from {CT_FINDINGS}")
    findings = [f for f in CT_FINDINGS if f in findings]
    sx = float(rng.uniform(300, 370) / X)
    sz = float(rng.choice([2.5, 3.0, 3.75, 5.0]) * 48 / Z)
    sp = (sx, sx, sz)
    zf = (np.arange(Z, dtype=np.float32) / max(Z - 1, 1))[:, None, None]       # 0 inferior .. 1 superior
    yn = (np.arange(Y, dtype=np.float32) / Y)[None, :, None]
    xn = (np.arange(X, dtype=np.float32) / X)[None, None, :]
    y2, x2 = yn[0], xn[0]                                                      # 2D broadcasting helpers

    bcy, brx, bry = 0.5 + rng.uniform(-0.03, 0.03), rng.uniform(0.40, 0.46), rng.uniform(0.28, 0.33)
    rb = np.hypot((x2 - 0.5) / brx, (y2 - bcy) / bry) * (1 + 0.02 * np.cos(3 * np.arctan2(y2 - bcy, x2 - 0.5)))
    body2 = rb < 1
    fat_t = rng.uniform(0.04, 0.09)
    vol = np.full((Z, Y, X), -1000, np.float32)
    sl2 = np.where(rb < 1 - fat_t, 45.0, np.where(body2, -100.0, -1000.0)).astype(np.float32)
    vol[:] = sl2
    body = np.broadcast_to(body2, (Z, Y, X)).copy()
    # table under the patient
    ty = bcy + bry + 0.04
    vol[:] += np.where(np.abs(y2 - ty - 0.06 * (x2 - 0.5) ** 2) < 0.012, 1100.0, 0.0) * (np.abs(x2 - 0.5) < 0.45)

    # lungs
    lungs_side = []
    heart = (((xn - 0.56) / 0.15) ** 2 + ((yn - (bcy - 0.07)) / 0.13) ** 2 + ((zf - 0.3) / 0.35) ** 2) < 1
    heart = np.broadcast_to(heart, (Z, Y, X))
    apex = rng.uniform(1.02, 1.15)
    for side, sgn in ((0, -1), (1, 1)):
        lcx = 0.5 + sgn * rng.uniform(0.17, 0.2)
        lrx, lry = rng.uniform(0.12, 0.15), rng.uniform(0.19, 0.22)
        taper = np.sqrt(np.clip((apex - zf) / 0.45, 0, 1))
        u = (xn - lcx) / (lrx * taper + 1e-3)
        v = (yn - bcy + 0.01) / (lry * taper + 1e-3)
        inpl = (np.abs(u) ** 2.4 + np.abs(v) ** 2.2) < 1
        dome = rng.uniform(0.02, 0.12) - (0.05 if side == 0 else 0) + 0.25 * np.clip(1 - u ** 2 - v ** 2, 0, 1)
        lung = inpl & (zf > dome) & (sgn * (xn - 0.5) > 0.06) & ~heart & body2
        lungs_side.append(lung)
    lungs = lungs_side[0] | lungs_side[1]
    vol[heart & body] = 40
    # aorta, spine, ribs
    spine_y = bcy + bry * 0.6
    vol[:] = np.where(np.hypot(x2 - 0.55, y2 - (spine_y - 0.11)) < 0.035, 50.0, vol)
    vb = np.hypot(x2 - 0.5, y2 - spine_y)
    disc = (np.sin(zf * Z * sz / 25.0 * 2 * np.pi) > 0.8)
    vol[:] = np.where(vb < 0.05, np.where(disc, 80.0, 300.0), vol)
    vol[:] = np.where((vb >= 0.05) & (vb < 0.058), 700.0, vol)
    vol[:] = np.where(np.hypot(x2 - 0.5, y2 - spine_y - 0.085) < 0.018, 15.0, vol)
    vol[:] = np.where((np.abs(x2 - 0.5) < 0.012) & (np.abs(y2 - spine_y - 0.12) < 0.03), 500.0, vol)
    ang = np.arctan2(yn - bcy, xn - 0.5)
    ribband = (rb > 1 - fat_t - 0.05) & (rb < 1 - fat_t - 0.015)
    ribs = ribband & (np.cos(9 * ang + zf * Z * sz / 18.0) > 0.55) & (np.abs(ang + np.pi / 2) > 0.35)
    vol[ribs] = 650
    sternum = (np.abs(x2 - 0.5) < 0.03) & ribband & (y2 < bcy)
    vol[:] = np.where(sternum, 400.0, vol)
    # lung parenchyma with vessels (denser near the hila)
    hil = np.exp(-(((xn - 0.5) / 0.2) ** 2 + ((yn - bcy) / 0.25) ** 2))
    ves = _ridges(rng, (Z, Y, X), 1.2, 0.12) * (0.3 + 0.7 * hil)
    parenchyma = -860 + 30 * _field(rng, (Z, Y, X), 4) + 650 * ves + 40 * (yn - bcy) / bry   # dependent density
    vol = np.where(lungs, parenchyma, vol)

    masks, facts = {}, []
    zz, yy, xx = np.ogrid[0:Z, 0:Y, 0:X]
    spa = np.array([sz, sx, sx])
    for f in findings:
        side = int(rng.integers(2))
        lung = lungs_side[side]
        if f in ("lung nodule", "lung mass"):
            rmm = rng.uniform(3.5, 12) if f == "lung nodule" else rng.uniform(17, 28)
            rmm = max(rmm, 1.8 * sx)                    # at least a few voxels across
            rv = rmm / spa
            for _ in range(60):
                c = np.array(_pick(rng, lung))
                lo, hi = np.maximum(c - np.ceil(rv * 0.7).astype(int), 0), np.minimum(c + np.ceil(rv * 0.7).astype(int) + 1, (Z, Y, X))
                if lung[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]].mean() > 0.85:
                    break
            lo = np.maximum(c - np.ceil(rv * 1.6).astype(int), 0)
            hi = np.minimum(c + np.ceil(rv * 1.6).astype(int) + 1, (Z, Y, X))
            sl = tuple(slice(a, b) for a, b in zip(lo, hi))
            axes = rv * rng.uniform(0.8, 1.15, 3)
            d = np.sqrt(((zz[sl[0]] - c[0]) / axes[0]) ** 2 + ((yy[:, sl[1]] - c[1]) / axes[1]) ** 2
                        + ((xx[..., sl[2]] - c[2]) / axes[2]) ** 2)
            spic = f == "lung mass" and rng.random() < 0.6
            irregular = rng.uniform(0.05, 0.12) + (0.12 if spic else 0)
            d = d + irregular * _field(rng, d.shape, 1.0 if spic else 2.0)
            m = np.zeros((Z, Y, X), bool)
            m[sl] = (d < 1) & lung[sl]
            vol[sl] = np.where(m[sl], rng.uniform(15, 55) + 15 * _field(rng, d.shape, 1.0), vol[sl])
            vol[sl] = np.where((d >= 1) & (d < 1.25) & lung[sl], np.maximum(vol[sl], -600), vol[sl])
            zc = c[0] / max(Z - 1, 1)
            zr = np.flatnonzero(lung.any((1, 2))) / max(Z - 1, 1)
            frac = 1 - (zc - zr[0]) / max(zr[-1] - zr[0], 1e-6)      # 0 apex .. 1 base
            diam = 2 * rmm * float(np.mean(axes / rv))
            adj = ("Spiculated" if spic else ["Lobulated", "Solid", "Irregular"][rng.integers(3)]) if f == "lung mass" \
                else ["Solid", "Well-circumscribed", "Round"][rng.integers(3)]
            noun = "mass" if f == "lung mass" else "nodule"
            facts.append(f"{adj} {diam:.0f} mm {noun} in the {_side_words(side)} {_lobe(side, frac)}.")
        else:  # pleural effusion: dependent (posterior) crescent at the lung base
            post = Y - 1 - np.argmax(lung[:, ::-1, :], axis=1)                 # (Z, X) posterior lung edge
            has = lung.any(axis=1)
            tmm = rng.uniform(12, 30)
            zr = np.flatnonzero(lung.any((1, 2)))
            t = tmm / sx * np.clip(1 - (np.arange(Z) - zr[0]) / (0.55 * (zr[-1] - zr[0]) + 1e-6), 0, 1)
            m = lung & (yy > (post - t[:, None])[:, None, :]) & has[:, None, :]
            vol = np.where(m, rng.uniform(5, 20), vol)
            size_w = "Small" if tmm < 20 else "Moderate"
            facts.append(f"{size_w} {_side_words(side)} pleural effusion.")
        masks[f] = m
    negs = []
    for f in CT_FINDINGS:
        if f not in findings and rng.random() < 0.7:
            negs.append(_neg(rng, {"lung nodule": "pulmonary nodule", "lung mass": "lung mass"}.get(f, f)))
    if not findings:
        facts.insert(0, ["Lungs are clear.", "No acute intrathoracic abnormality."][rng.integers(2)])
    diagnosis = "lung cancer" if "lung mass" in findings else ("lung nodule" if "lung nodule" in findings
                                                               else ("pleural effusion" if findings else "normal"))
    report = " ".join(facts + negs)

    vol = ndi.gaussian_filter(vol, (0.4, 0.7, 0.7)) + rng.normal(0, rng.uniform(8, 20), vol.shape).astype(np.float32)
    vol = np.clip(np.round(vol), -1024, 3071).astype(np.int16)
    concepts = {f: int(f in findings) for f in CT_FINDINGS}
    return Sample("ct", vol, masks, {k: mask_box(v) for k, v in masks.items()}, concepts, diagnosis, report,
                  {"body": body, "lungs": lungs}, sp, {"seed": seed, "shortcut": False})


CT_DIAGNOSES = ["normal", "lung nodule", "lung cancer", "pleural effusion"]


def make_sample(family: str, seed: int, **kw) -> Sample:
    """Dispatch to make_chest / make_derm / make_ct by family name."""
    fns = {"chest": make_chest, "derm": make_derm, "ct": make_ct}
    if family not in fns:
        raise ValueError(f"unknown phantom family {family!r}; choose from {sorted(fns)}")
    return fns[family](seed, **kw)
