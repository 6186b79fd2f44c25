"""`explain` infer task (type segmentation, so stock viewers run it): a thin adapter over
`clinlens.explain.grad_eclip` (methods.md §4, MedGrad E-CLIP on the real multi-head Grad-ECLIP).

- Target: the config `target` (findings and concepts; Slicer shows a choice box) or free text in
  `prompt` (negated prompts included: "no effusion" explains the effusion evidence, flagged
  `negated`). `method`, `radius` (entropy disk, px at 224²) and `entropy_on` pass through. `blocks`:
  "all" (the signed contributions of every vision block summed, the default: more faithful on the
  phantoms), "last" (the paper's last block) or a number of last blocks. `gradient`: "direct" (the
  default: channel weights along the residual stream, so all blocks cost ~1.3x a forward) or "exact" (a
  backward through the blocks: the paper's gradient, ~2.7x a forward over all blocks). The default pair is
  the only one that beat Grad-CAM on deletion, insertion and pointing within 1.5x a forward on the
  validation phantoms (benchmarks/results/explain_blocks.md).
- Stock Slicer/OHIF: a labelmap of quantised heat levels named "heat 80-100% · nodule".
- Plugins: `result_dtype: float32` gives the float heatmap as NRRD or NIfTI.
- JSON: the top regions (boxes of the hottest connected areas) and the word importances.
- 2D images, a chosen `slice`, or a whole volume (slice-wise, one scale across slices).
"""
from __future__ import annotations

import numpy as np
from monailabel.interfaces.tasks.infer_v2 import InferType
from scipy import ndimage as ndi

from clinlens.data.conventions import RequestError, choice_option, number_option, parse_prompts, place_2d, slice_2d
from clinlens.data.image_io import file_ext, to_unit_rgb
from clinlens.explain.grad_eclip import BLOCK_METHODS, GRADIENTS, METHODS, explain, explain_volume
from clinlens.infer.base import ClinlensInfer

FLOAT_EXTS = (".nrrd", ".nii.gz", ".nii")
BLOCKS = ("all", "last")  # the first is the default (Slicer sends the whole list back when left untouched)
GRADIENT_CHOICES = ("direct", "exact")


def method_defaults(method: str) -> tuple[str, str]:
    """(blocks, gradient) when the client names none: all blocks along the direct path for MedGrad and
    Grad-ECLIP (chosen on validation phantoms), the last block for the maps that have no other."""
    return (BLOCKS[0], GRADIENT_CHOICES[0]) if method in BLOCK_METHODS else ("last", "exact")


def chosen(request: dict, key: str):
    """The client's own value of `key`, or None: absent, empty, or Slicer's untouched choice list."""
    value = request.get(key)
    return None if value is None or value == "" or isinstance(value, list) else value


def blocks_option(request: dict, depth: int) -> int:
    """`blocks`: "all" (default) -> the vision tower's depth, "last" -> 1, or a number of last blocks in 1..depth."""
    value = choice_option(request, "blocks", BLOCKS[0])
    if value in BLOCKS:
        return 1 if value == "last" else depth
    if isinstance(value, str) and not value.strip().isdigit():
        raise RequestError(f"'blocks' must be 'last', 'all' or a number of last blocks in [1, {depth}], got {value!r}")
    return number_option({"blocks": value}, "blocks", 1, int, 1, depth)


def heat_levels(heat: np.ndarray, levels: int, floor: float) -> np.ndarray:
    """Heat in [0, 1] -> uint8 labels 1..n for the bins above `floor` (0 below it)."""
    edges = np.linspace(floor, 1.0, levels + 1)
    lab = np.digitize(heat, edges[1:-1], right=False) + 1
    return np.where(heat >= floor, lab, 0).astype(np.uint8)


def evidence(heat: np.ndarray, shown: str, more_blocks: bool = False) -> dict:
    """Whether any pixel has heat. A map can be empty (every patch's weighted contribution negative); the JSON
    says so in words instead of leaving an empty labelmap, and with `more_blocks` (a Grad-ECLIP/MedGrad map
    over fewer than all blocks) says what to ask instead."""
    if float(np.max(heat, initial=0.0)) > 0:
        return {"evidence": True}
    msg = f"no region raises the image's match with {shown!r}: the heatmap is empty"
    if more_blocks:
        msg += ("; the blocks explained may carry none (on the default model the last block alone has none for "
                "about a third of the derm diagnoses): ask 'blocks': 'all'")
    return {"evidence": False, "message": msg}


def top_regions(heat: np.ndarray, level: float = 0.8, n: int = 3) -> list[dict]:
    """Boxes of the hottest connected areas (heat >= level), hottest first; (z,) y, x order of `heat`."""
    lab, k = ndi.label(heat >= level)
    out = []
    for i, sl in enumerate(ndi.find_objects(lab), 1):
        region = lab[sl] == i
        vals = heat[sl][region]
        lo = [s.start for s in sl][::-1]
        hi = [s.stop for s in sl][::-1]
        out.append({"box": lo + hi, "peak": round(float(vals.max()), 4), "mean": round(float(vals.mean()), 4),
                    "pixels": int(region.sum())})
    return sorted(out, key=lambda r: (-r["peak"], -r["pixels"]))[:n]


class ExplainInfer(ClinlensInfer):
    def __init__(self, clip, targets: list[str]):
        super().__init__(type=InferType.SEGMENTATION, labels=[], dimension=2,
                         description="Why: MedGrad E-CLIP heatmap for a finding, concept or free text",
                         config={"target": list(targets), "method": list(METHODS), "blocks": list(BLOCKS),
                                 "gradient": list(GRADIENT_CHOICES),
                                 "radius": 5.0, "levels": 4, "floor": 0.2})
        self.clip = clip
        self.targets = list(targets)

    def run(self, request, image):
        prompt = request.get("prompt")
        if prompt is not None:
            if not isinstance(prompt, str) or not prompt.strip():
                raise RequestError("'prompt' is empty: give a finding, a concept or free text")
            target = prompt.strip()
        else:
            target = choice_option(request, "target", self.targets[0])
            if target not in self.targets:
                raise RequestError(f"unknown target {target!r}; choose from {self.targets} or send free text as 'prompt'")
        method = choice_option(request, "method", "medgrad")
        radius = number_option(request, "radius", self._config["radius"])
        if radius <= 0:
            raise RequestError(f"'radius' must be > 0 (entropy disk radius in px), got {radius}")
        levels = number_option(request, "levels", self._config["levels"], int, 1, 20)
        floor = number_option(request, "floor", self._config["floor"], float, 0, 0.99)
        as_float = str(request.get("result_dtype", "")).lower() == "float32"
        ext = request.get("result_extension") or file_ext(image.path)
        if as_float and not str(ext).endswith(FLOAT_EXTS):
            raise RequestError(f"float32 needs an NRRD or NIfTI result ('result_extension': '.nrrd'); "
                               f"{ext} cannot hold floats")
        p = parse_prompts(request, image.size_ijk, dimension=2)
        bundle = self.clip.get()
        depth = len(bundle.model.vision_model.encoder.layers)
        default_blocks, default_gradient = method_defaults(method)
        blocks = blocks_option({"blocks": chosen(request, "blocks") or default_blocks}, depth)
        gradient = choice_option({"gradient": chosen(request, "gradient")}, "gradient", default_gradient, GRADIENTS)
        kw = dict(target_text=target, method=method, radius=radius, entropy_on=request.get("entropy_on", "image"),
                  blocks=blocks, gradient=gradient)
        try:
            if len(image.spatial_shape) == 3 and not image.is_rgb and p.slice is None:
                vol = image.array
                r = explain_volume(bundle, lambda z: to_unit_rgb(vol[z]), vol.shape[0], **kw)
                heat = r["upsampled"].astype(np.float32)
                words = None
            else:
                plane = to_unit_rgb(slice_2d(image.array, p.slice, image.is_rgb))
                r = explain(bundle, image=plane, **kw)
                heat = r["upsampled"].astype(np.float32)
                words = r.get("words")
        except ValueError as e:
            raise RequestError(str(e)) from e
        shown = r.get("target") or target
        result = {"target": target, "explained": shown, "negated": bool(r.get("negated")), "method": method,
                  "blocks": blocks, "gradient": gradient, "top_regions": top_regions(heat), "words": words,
                  "scale": r.get("scale"),
                  **evidence(heat, shown, method in BLOCK_METHODS and blocks < depth)}
        if as_float:
            out = heat
            result["label_names"] = {f"heat · {shown}": 1}
        else:
            out = heat_levels(heat, levels, floor)
            edges = np.linspace(floor, 1.0, levels + 1)
            result["label_names"] = {f"heat {round(100 * edges[i])}-{round(100 * edges[i + 1])}% · {shown}": i + 1
                                     for i in range(levels)}
        if heat.ndim == 2:
            out = place_2d(out, image.spatial_shape, p.slice)
        return out, result
