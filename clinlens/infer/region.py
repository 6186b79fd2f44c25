"""Region infer tasks (MedP-CLIP, methods.md §1) as stock Slicer and OHIF drive them.

- `region_seg` (deepgrow, 2D): clicks, Slicer's ROI box and an optional mask prompt (an uploaded
  `label` file, or the previous result of the same segment while its clicks only grow).
- `region_seg_3d` (deepgrow, 3D): segment every clicked slice, then propagate slice to slice.
- `text_seg` (segmentation): a finding name or free text -> the candidate region whose embedding
  matches the text best -> its mask. With `contrast: "vocabulary"` (default) the prompt competes with
  its negation and the image family's other findings, p = softmax(s * [prompt, no prompt, others])[0];
  `"negation"` keeps only the negation (a 2-way softmax, which some region almost always passes).

Every answer carries "what is here": the region embedding against the finding vocabulary.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from monailabel.interfaces.tasks.infer_v2 import InferType

from clinlens.data.conventions import RequestError, choice_option, number_option, parse_prompts, place_2d, slice_2d
from clinlens.data.image_io import load_image, to_unit_rgb
from clinlens.infer.base import ClinlensInfer, family_of, upload_path
from clinlens.models.region_clip import region_path
from clinlens.models.region_predictor import RegionPredictor
from clinlens.models.zeroshot import NEGATIVE_TEMPLATES, POSITIVE_TEMPLATES


class LazyRegion:
    """The region predictor on top of a `LazyClip`: the trained model at `publish_path` when there
    is one, else the one shipped beside the CLIP weights. Rebuilt when either changes."""

    def __init__(self, clip, publish_path: str | Path):
        self.clip = clip
        self.publish_path = Path(publish_path)
        self._pred: RegionPredictor | None = None

    def path(self, bundle) -> Path:
        return self.publish_path if self.publish_path.is_file() else region_path(bundle.path)

    def get(self) -> RegionPredictor:
        bundle = self.clip.get()
        path = self.path(bundle)
        if not path.is_file():
            raise RequestError(f"no region model for {bundle.path}: train one (POST /train/region_seg)", status=409)
        p = self._pred
        if p is None or p.bundle is not bundle or p.model_path != path:
            self._pred = RegionPredictor.from_bundle(bundle, path)
        return self._pred


def what_is_here(bundle, embedding: np.ndarray, names: list[str], top: int = 3) -> list[dict]:
    """Region embedding vs the finding vocabulary: softmax over names (scaled cosine)."""
    with torch.no_grad():
        t = bundle.encode_texts([f"{n}." for n in names]).float().cpu()
    logits = bundle.logit_scale.item() * (t @ torch.as_tensor(embedding, dtype=torch.float32))
    p = logits.softmax(0).numpy()
    return [{"finding": names[i], "score": round(float(p[i]), 4)} for i in np.argsort(-p)[:top]]


def _box_xy(roi) -> list[float] | None:
    """Normalised ROI (IJK pairs) -> in-plane half-open box [x0, y0, x1, y1]."""
    return None if roi is None else [float(roi[0, 0]), float(roi[1, 0]), float(roi[0, 1]), float(roi[1, 1])]


def _mask_prompt(request, image, k) -> np.ndarray | None:
    path = upload_path(request)
    if path is None:
        return None
    m = load_image(path)
    arr = m.array[..., 0] if m.is_rgb else m.array
    arr = np.squeeze(arr) if arr.ndim == 3 and 1 in arr.shape else arr
    want = image.spatial_shape[-2:]
    if arr.ndim == 3 and arr.shape == image.spatial_shape:
        arr = arr[image.spatial_shape[0] // 2 if k is None else k]
    if arr.shape != tuple(want):
        raise RequestError(f"mask prompt has shape {tuple(m.spatial_shape)}; the image is {image.spatial_shape} (array order)")
    return arr > 0


def _label_name(request, default: str) -> str:
    lab = request.get("label")
    return lab if isinstance(lab, str) and lab and not upload_path(request) else default


class _RegionTask(ClinlensInfer):
    def __init__(self, region: LazyRegion, vocab: dict, labels, type, dimension, description, config=None):
        """`vocab`: family ("chest", "derm", "ct") -> the names "what is here" chooses from."""
        super().__init__(type=type, labels=labels, dimension=dimension, description=description, config=config or {})
        self.region = region
        self.vocab = {k: list(v) for k, v in vocab.items()}
        self.names = list(dict.fromkeys(n for v in vocab.values() for n in v))

    def answer(self, pred, res, label: str, extra: dict, image=None) -> dict:
        names = self.vocab[family_of(image)] if image is not None else self.names
        return {
            "label_names": {label: 1},
            "what_is_here": what_is_here(pred.bundle, res["region_embedding"], names),
            "latencies": {k + "_ms": v for k, v in res.get("timings_ms", {}).items()},
            **extra,
        }


class RegionSegInfer(_RegionTask):
    def __init__(self, region, vocab, labels):
        # the segment's previous mask goes back in as a prompt while its clicks only grow (SAM-style
        # refinement; the region model is trained for it and the benchmark's ablation shows it helps)
        super().__init__(region, vocab, labels, InferType.DEEPGROW, 2,
                         "Region-aware CLIP: clicks/box -> mask and what is here (2D)",
                         config={"use_previous_mask": True})
        self._last: OrderedDict = OrderedDict()  # (image, label) -> (fg points, mask) for mask prompts

    def run(self, request, image):
        p = parse_prompts(request, image.size_ijk, dimension=2)
        if len(p.foreground) == 0 and p.roi is None:
            raise RequestError("region_seg needs at least one foreground click or a box (roi)")
        plane = to_unit_rgb(slice_2d(image.array, p.slice, image.is_rgb))
        fg, bg = p.foreground[:, :2], p.background[:, :2]
        label = _label_name(request, "region")
        key = (request["image"], p.slice, label)
        mask_prompt = _mask_prompt(request, image, p.slice)
        pred = self.region.get()
        clicks = ({tuple(x) for x in fg.tolist()}, {tuple(x) for x in bg.tolist()})
        stamp = (id(pred), pred._model_mtime())
        use_prev = str(request.get("use_previous_mask", self._config["use_previous_mask"])).lower() == "true"
        if use_prev and mask_prompt is None and key in self._last:  # same segment and model, clicks added
            prev_clicks, prev_mask, prev_stamp = self._last[key]
            grown = sum(map(len, clicks)) > sum(map(len, prev_clicks))
            if prev_stamp == stamp and grown and prev_clicks[0] <= clicks[0] and prev_clicks[1] <= clicks[1]:
                mask_prompt = prev_mask
        res = pred.predict(plane, request["image"], fg, bg, _box_xy(p.roi), mask_prompt, slice=p.slice)
        self._last[key] = (clicks, res["mask"], stamp)
        while len(self._last) > 32:
            self._last.popitem(last=False)
        mask = place_2d(res["mask"].astype(np.uint8), image.spatial_shape, p.slice)
        return mask, self.answer(pred, res, label, {"window": res["window"], "cached": res["cached"],
                                                    "mask_prompt": mask_prompt is not None}, image)


class RegionSeg3DInfer(_RegionTask):
    def __init__(self, region, vocab, labels):
        super().__init__(region, vocab, labels, InferType.DEEPGROW, 3,
                         "Region-aware CLIP: clicks/box on any slices -> 3D mask by slice propagation")

    def run(self, request, image):
        if len(image.spatial_shape) != 3 or image.is_rgb:
            raise RequestError("region_seg_3d needs a 3D volume; use region_seg for 2D images")
        p = parse_prompts(request, image.size_ijk, dimension=3)
        if len(p.foreground) == 0 and p.roi is None:
            raise RequestError("region_seg_3d needs at least one foreground click or a box (roi)")
        box = None if p.roi is None else [float(p.roi[0, 0]), float(p.roi[1, 0]), float(p.roi[2, 0]),
                                          float(p.roi[0, 1]), float(p.roi[1, 1]), float(p.roi[2, 1])]
        pred = self.region.get()
        t0 = time.perf_counter()
        res = pred.predict_3d(lambda z: to_unit_rgb(image.array[z]), image.spatial_shape[0], request["image"],
                              p.foreground.astype(float), p.background.astype(float), box)
        ms = round(1000 * (time.perf_counter() - t0), 1)
        z = np.flatnonzero(res["mask"].any(axis=(1, 2)))
        extra = {"seed_slices": res["seeds"], "slices": [int(z.min()), int(z.max())] if len(z) else []}
        return res["mask"].astype(np.uint8), self.answer(pred, {**res, "timings_ms": {"model": ms}},
                                                         _label_name(request, "region"), extra, image)


def candidate_boxes(h: int, w: int, fractions=(0.5, 0.25)) -> list[list[float]]:
    """Sliding square boxes at a few scales (stride half a box), plus the whole image."""
    out = [[0.0, 0.0, float(w), float(h)]]
    for f in fractions:
        s = max(8, int(round(f * min(h, w))))
        for y in range(0, max(h - s, 0) + 1, max(1, s // 2)):
            for x in range(0, max(w - s, 0) + 1, max(1, s // 2)):
                out.append([float(x), float(y), float(x + s), float(y + s)])
    return out


TEXT_SEG_CONTRASTS = ("vocabulary", "negation")


def competitors(vocab, finding: str) -> list[str]:
    """The family's findings a prompt competes with: all but those naming the same thing (one name
    containing the other: "nodule" / "lung nodule")."""
    f = finding.strip().lower()
    return [v for v in vocab if v.lower() not in f and f not in v.lower()]


class TextSegInfer(_RegionTask):
    def __init__(self, region, vocab, labels):
        super().__init__(region, vocab, labels, InferType.SEGMENTATION, 2,
                         "Text-prompted segmentation: a finding name or free text -> mask",
                         config={"prompt": list(dict.fromkeys(n for v in vocab.values() for n in v)), "threshold": 0.5,
                                 "contrast": list(TEXT_SEG_CONTRASTS)})

    def _text(self, bundle, prompt: str, others=()):
        """(2 + len(others), D): the prompt, its negation, then each competing finding (template means)."""
        with torch.no_grad():
            rows = [bundle.encode_texts([t.format(prompt) for t in POSITIVE_TEMPLATES]).mean(0),
                    bundle.encode_texts([t.format(prompt) for t in NEGATIVE_TEMPLATES]).mean(0)]
            rows += [bundle.encode_texts([t.format(o) for t in POSITIVE_TEMPLATES]).mean(0) for o in others]
        return torch.stack(rows).float().cpu()

    def _best_on(self, pred, plane, key, k, text, fractions=(0.5, 0.25)):
        best = None
        for box in candidate_boxes(*plane.shape[:2], fractions=fractions):
            res = pred.predict(plane, key, box=box, slice=k)
            if not res["mask"].any():
                continue
            logit = pred.bundle.logit_scale.item() * (text @ torch.as_tensor(res["region_embedding"]))
            p = float(logit.softmax(0)[0])
            if best is None or p > best[0]:
                best = (p, res)
        return best

    def _likely_slices(self, pred, image, key, text, keep: int = 2, max_slices: int = 32) -> list[int]:
        """Volumes: scan (at most `max_slices` evenly spaced) slices with the coarse boxes only, rank them by
        their best region's p(prompt), and search the best few finely. (Ranking by whole-slice zero-shot
        p picked the end slices of nearly every CT phantom: a truth slice among the top 2 in 7% of
        findings, against 40% for this scan.)"""
        depth = image.spatial_shape[0]
        ks = np.unique(np.linspace(0, depth - 1, min(depth, max_slices)).round().astype(int))
        p = []
        for k in ks:
            best = self._best_on(pred, to_unit_rgb(image.array[k]), key, int(k), text, fractions=(0.5,))
            p.append(best[0] if best else 0.0)
        return [int(ks[i]) for i in np.argsort(-np.asarray(p), kind="stable")[:keep]]

    def run(self, request, image):
        prompt = choice_option(request, "prompt", self._config["prompt"][0])
        if not isinstance(prompt, str) or not prompt.strip():
            raise RequestError("'prompt' must be a finding name or free text")
        from clinlens.text.negation import NEGATED, parse_prompt

        try:
            finding, polarity = parse_prompt(prompt)
        except ValueError as e:
            raise RequestError(f"bad 'prompt': {e}") from e
        if polarity == NEGATED:
            raise RequestError(f"'{prompt}' is negated: there is no region to segment; ask for '{finding}' "
                               "(or use zeroshot, which scores negated prompts)")
        contrast = choice_option(request, "contrast", TEXT_SEG_CONTRASTS[0], TEXT_SEG_CONTRASTS)
        p = parse_prompts(request, image.size_ijk, dimension=2)
        pred = self.region.get()
        others = competitors(self.vocab[family_of(image)], finding) if contrast == "vocabulary" else []
        text = self._text(pred.bundle, prompt.strip(), others)
        t0 = time.perf_counter()
        volume = len(image.spatial_shape) == 3 and not image.is_rgb
        slices = ([p.slice] if (p.slice is not None or not volume)
                  else self._likely_slices(pred, image, request["image"], text))
        best, best_k = None, None
        for k in slices:
            plane = to_unit_rgb(slice_2d(image.array, k, image.is_rgb))
            cand = self._best_on(pred, plane, request["image"], k, text)
            if cand and (best is None or cand[0] > best[0]):
                best, best_k = cand, k
        thr = number_option(request, "threshold", self._config["threshold"], float, 0, 1)
        found = best is not None and best[0] >= thr
        if not found:
            mask = np.zeros(image.spatial_shape, np.uint8)
        elif volume:
            mask = pred.propagate_3d(lambda z: to_unit_rgb(image.array[z]), image.spatial_shape[0], best_k,
                                     best[1]["mask"], request["image"]).astype(np.uint8)
        else:
            mask = best[1]["mask"].astype(np.uint8)
        extra = {"prompt": prompt, "contrast": contrast, "competitors": others, "found": found,
                 "score": round(best[0], 4) if best else 0.0,
                 "slice": best_k, "latencies": {"search_ms": round(1000 * (time.perf_counter() - t0), 1)}}
        res = best[1] if best else {"region_embedding": text[0].numpy()}
        out = self.answer(pred, res, prompt, extra, image)
        out["latencies"] = extra["latencies"]
        return mask, out
