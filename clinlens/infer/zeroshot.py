"""`zeroshot` infer task: whole-image finding probabilities, negation-aware.

Stock viewers show no classification results, and Slicer's client crashes on JSON-only replies,
so the answer also comes back as a labelmap: a thin frame round the image whose segment name
carries the top finding and its probability. The JSON part holds every score and the latency.
"""
from __future__ import annotations

import time

import numpy as np
import torch
from monailabel.interfaces.tasks.infer_v2 import InferType

from clinlens.data.conventions import RequestError, number_option, parse_prompts, place_2d, slice_2d
from clinlens.data.image_io import to_unit_rgb
from clinlens.infer.base import ClinlensInfer, family_of
from clinlens.models.zeroshot import ZeroShotScorer


def frame_mask(shape_yx: tuple[int, int], width: int = 2) -> np.ndarray:
    m = np.zeros(shape_yx, np.uint8)
    m[:width], m[-width:], m[:, :width], m[:, -width:] = 1, 1, 1, 1
    return m


class ZeroShotInfer(ClinlensInfer):
    """Thin adapter: request -> `ZeroShotScorer` -> labelmap + JSON."""

    def __init__(self, clip, vocab: dict[str, list[str]], description: str = "Zero-shot finding scores (negation-aware)"):
        """`vocab`: family ("chest", "derm", "ct") -> the findings scored on such images."""
        findings = list(dict.fromkeys(f for names in vocab.values() for f in names))
        super().__init__(
            type=InferType.CLASSIFICATION,
            labels=findings,
            dimension=2,
            description=description,
            config={"threshold": 0.5},
        )
        self.clip = clip
        self.vocab = {k: list(v) for k, v in vocab.items()}

    def run(self, request, img):
        t0 = time.perf_counter()
        prompts = parse_prompts(request, img.size_ijk, dimension=2)
        plane = slice_2d(img.array, prompts.slice, img.is_rgb)
        t_load = time.perf_counter()

        bundle = self.clip.get()
        extra = request.get("prompts") or []
        if isinstance(extra, str):
            extra = [extra]
        base = self.vocab[family_of(img)]
        names = base + [p for p in extra if isinstance(p, str) and p.strip() and p not in base]
        try:
            scorer = ZeroShotScorer(bundle, names)
        except ValueError as e:  # an empty or finding-less free-text prompt
            raise RequestError(f"bad prompt in 'prompts': {e}") from e
        with torch.inference_mode():
            probs = scorer(bundle.pixel_values(to_unit_rgb(plane)))[0].float().cpu().numpy()
        t_model = time.perf_counter()

        order = np.argsort(-probs)
        scores = [{"finding": names[i], "probability": round(float(probs[i]), 4)} for i in order]
        top = scores[0]
        label_name = f"{top['finding']} {top['probability']:.2f}"

        mask = place_2d(frame_mask(plane.shape[:2]), img.spatial_shape, prompts.slice)
        thr = number_option(request, "threshold", self._config["threshold"], float, 0, 1)
        result = {
            "label_names": {label_name: 1},
            "findings": scores,
            "positive": [s["finding"] for s in scores if s["probability"] >= thr],
            "model": str(bundle.path),
            "latencies": {"prompt_ms": round(1000 * (t_load - t0), 1), "model_ms": round(1000 * (t_model - t_load), 1)},
        }
        return mask, result
