"""CSR infer tasks (methods.md §2): thin adapters over `CSRModel`.

- `concepts` (classification): class probabilities, per-concept scores (rejected concepts last, marked
  `rejected`) and the top prototypes with their atlas references (the training image and box, also as
  fractions of that image: `box_relative`) and evidence boxes (where the score's maximum lies).
  Honours Slicer's `roi` (a positive box), a `boxes` list
  ([{"box": [x0, y0, x1, y1], "polarity": "positive" | "negative"}], image pixels, half-open),
  `reject_concepts` and `alpha`. A thin frame labelmap named after the top class comes back too
  (stock Slicer crashes on JSON-only replies).
- `concept_regions` (segmentation): a labelmap of the evidence regions of the top concepts; label
  names carry the concept and its score ("pigment network 0.71"), so stock viewers show the reasoning.
- `prompt_classify` (classification): the ClinCoCoOp classifier, its concept weights α in the JSON.

Both work on 2D images and on a chosen `slice` of a volume; given none (OHIF sends none), on the slice
whose strongest concept scores highest (within an roi's slices). One CSR model per image family
(`clinlens.trainers.concepts.csr_file`): the published one in `model_dir`, else the shipped one
beside the CLIP weights; reloaded when the file changes.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monailabel.interfaces.tasks.infer_v2 import InferType

from clinlens.data.conventions import (RequestError, name_list, number_option, parse_box, parse_prompts, place_2d,
                                       slice_2d)
from clinlens.data.image_io import to_unit_rgb
from clinlens.infer.base import ClinlensInfer, family_of
from clinlens.infer.zeroshot import frame_mask
from clinlens.models.csr import CSRModel
from clinlens.trainers.concepts import csr_file


class LazyFamilyModel:
    """family -> a model on the current CLIP; the file published in `model_dir` wins over the one shipped
    beside the CLIP weights; reloaded when the file or the CLIP changes. `file_fn(dir, family)` names the
    file, `load(bundle, path)` loads it; `task` is the train task that publishes it."""

    def __init__(self, clip, model_dir, file_fn, load, what: str, task: str):
        self.clip = clip
        self.model_dir = Path(model_dir)
        self.file_fn, self.load, self.what, self.task = file_fn, load, what, task
        self._models: dict = {}

    def path(self, family: str) -> Path:
        pub = self.file_fn(self.model_dir, family)
        return pub if pub.is_file() else self.file_fn(self.clip.path, family)

    def get(self, family: str):
        bundle = self.clip.get()
        path = self.path(family)
        if not path.is_file():
            raise RequestError(f"no {self.what} for {family} images: train one (POST /train/{self.task})", status=409)
        key = (id(bundle), str(path), path.stat().st_mtime)
        hit = self._models.get(family)
        if hit is None or hit[0] != key:
            self._models[family] = (key, self.load(bundle, path))
        return self._models[family][1]


def LazyCSR(clip, model_dir) -> LazyFamilyModel:
    return LazyFamilyModel(clip, model_dir, csr_file, CSRModel.load, "concept model", "concepts")


def LazyPromptLearner(clip, model_dir) -> LazyFamilyModel:
    from clinlens.models.prompt_learner import ClinCoCoOp
    from clinlens.trainers.prompt_learning import prompt_file

    return LazyFamilyModel(clip, model_dir, prompt_file, ClinCoCoOp.load, "prompt learner", "prompt_learner")


def _boxes(request, hw, S: int, roi) -> tuple[list, list]:
    """Positive/negative boxes on the model input (pixels, half-open) from `roi` and `boxes` (`parse_box`)."""
    H, W = hw
    sx, sy = S / W, S / H
    pos, neg = [], []
    if roi is not None:
        pos.append([roi[0, 0], roi[1, 0], roi[0, 1], roi[1, 1]])
    items = request.get("boxes") or []
    if not isinstance(items, list):
        raise RequestError("'boxes' must be a list of {\"box\": [x0, y0, x1, y1], \"polarity\": ...}")
    for it in items:
        b = parse_box(it, hw)
        (pos if b["polarity"] == "positive" else neg).append(b["box"])
    scale = lambda b: [b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy]  # noqa: E731
    return [scale(b) for b in pos], [scale(b) for b in neg]


def csr_over_slices(model, bundle, volume: np.ndarray, batch: int = 8, reject=None) -> tuple[np.ndarray, np.ndarray]:
    """CSR on every axial slice of a grey volume (D, H, W), `batch` slices at a time -> class probabilities
    (D, C) and concept scores (D, K), rejected concepts zeroed."""
    probs, cscores = [], []
    with torch.no_grad():
        for z0 in range(0, volume.shape[0], batch):
            planes = np.stack([to_unit_rgb(volume[z]) for z in range(z0, min(volume.shape[0], z0 + batch))])
            out = model(bundle.pixel_values(planes, model.image_size), reject_concepts=reject or None)
            probs.append(out["logits"].softmax(-1).float().cpu().numpy())
            cscores.append(out["concept_scores"].float().cpu().numpy())
    return np.concatenate(probs), np.concatenate(cscores)


def _atlas_entry(entry: dict | None, S: int) -> dict | None:
    """An atlas entry with `box_relative`: its box (model-input pixels, training images are resized to S x S)
    as fractions [x0, y0, x1, y1] of that training image's width and height, to draw on the image itself."""
    if entry is None:
        return None
    return {**entry, "box_relative": [round(v / S, 4) for v in entry["box"]]}


class _ConceptTask(ClinlensInfer):
    def __init__(self, csr: LazyCSR, type, description, config):
        super().__init__(type=type, labels=[], dimension=2, description=description, config=config)
        self.csr = csr

    def evaluate(self, request, image):
        """(plane, slice, CSRModel, forward outputs) for the request."""
        p = parse_prompts(request, image.size_ijk, dimension=2)
        model = self.csr.get(family_of(image))
        raw = request.get("reject_concepts")
        reject = [] if raw in (None, "", []) else name_list(raw, "reject_concepts", model.concepts, "concept")
        alpha = number_option(request, "alpha", model.config["alpha"], float, 0, 1)
        k = p.slice
        if k is None and len(image.spatial_shape) == 3 and image.spatial_shape[0] > 1:
            k = self.strongest_slice(model, image, p.roi, reject)
        plane = slice_2d(image.array, k, image.is_rgb)
        pos, neg = _boxes(request, plane.shape[:2], model.image_size, p.roi)
        bundle = self.csr.clip.get()
        with torch.no_grad():
            out = model(bundle.pixel_values(to_unit_rgb(plane), model.image_size), pos_boxes=pos or None, neg_boxes=neg or None,
                        alpha=alpha, reject_concepts=reject or None)
        out["rejected"] = reject
        return plane, k, model, out

    def strongest_slice(self, model, image, roi, reject) -> int:
        """A volume given no `slice` (OHIF sends none): the axial slice whose strongest kept concept scores
        highest (batch's key slice, `clinlens.batch.process.run_classify`), among the roi's slices if any."""
        k0, k1 = (int(roi[2, 0]), int(roi[2, 1])) if roi is not None and len(roi) == 3 else (0, image.spatial_shape[0])
        _, scores = csr_over_slices(model, self.csr.clip.get(), image.array[k0:k1], reject=reject)
        if reject:
            scores[:, model.concept_index(reject)] = -np.inf
        return k0 + int(scores.max(1).argmax())

    @staticmethod
    def evidence_box(model, out, j: int, hw) -> list[int]:
        """Image-pixel box of the patch where prototype column `j`'s score comes from (its evidence map's peak)."""
        h, w = model.grid
        m = model.evidence_maps(out["sim_maps"][0, j], out["importance"][0, 0]).flatten()
        r, c = divmod(int(m.argmax()), w)
        H, W = hw
        return [int(c * W / w), int(r * H / h), int(np.ceil((c + 1) * W / w)), int(np.ceil((r + 1) * H / h))]


class ConceptsInfer(_ConceptTask):
    def __init__(self, csr: LazyCSR):
        super().__init__(csr, InferType.CLASSIFICATION,
                         "Concept-similarity classification (CSR): class, concept scores, prototype evidence",
                         config={"alpha": 0.2, "top_prototypes": 5})

    def run(self, request, image):
        t0 = time.perf_counter()
        plane, k, model, out = self.evaluate(request, image)
        probs = out["logits"][0].softmax(-1).float().cpu().numpy()
        cscore = out["concept_scores"][0].float().cpu().numpy()
        pscore = out["proto_scores"][0].float().cpu().numpy()
        atlas = {e["prototype_id"]: e for e in model.atlas}
        top = number_option(request, "top_prototypes", self._config["top_prototypes"], int, 0)
        keep = out["keep"].cpu().numpy() > 0
        rejected = set(out["rejected"])
        protos = []
        for j in [j for j in np.argsort(-pscore) if keep[j]][:top]:  # a rejected concept is no evidence
            pid = int(model.proto_ids[j])
            protos.append({"prototype_id": pid, "concept": model.concepts[int(model.proto_concept[j])],
                           "score": round(float(pscore[j]), 4),
                           "evidence_box": self.evidence_box(model, out, int(j), plane.shape[:2]),
                           "atlas": _atlas_entry(atlas.get(pid), model.image_size)})
        order = np.argsort(-probs)
        classes = [{"class": model.classes[i], "probability": round(float(probs[i]), 4)} for i in order]
        label = f"{classes[0]['class']} {classes[0]['probability']:.2f}"
        concepts = [{"concept": c, "score": round(float(s), 4), **({"rejected": True} if c in rejected else {})}
                    for c, s in zip(model.concepts, cscore)]
        concepts.sort(key=lambda d: ("rejected" in d, -d["score"]))  # rejected ones last, whatever their score
        result = {"label_names": {label: 1}, "classes": classes, "concepts": concepts, "prototypes": protos,
                  **({"slice": k} if k is not None else {}),
                  "latencies": {"model_ms": round(1000 * (time.perf_counter() - t0), 1)}}
        return place_2d(frame_mask(plane.shape[:2]), image.spatial_shape, k), result


class ConceptRegionsInfer(_ConceptTask):
    def __init__(self, csr: LazyCSR):
        super().__init__(csr, InferType.SEGMENTATION,
                         "Evidence regions of the top concepts (CSR), named 'concept score'",
                         config={"alpha": 0.2, "top_concepts": 3, "level": 0.8})

    def run(self, request, image):
        plane, k, model, out = self.evaluate(request, image)
        H, W = plane.shape[:2]
        cscore = out["concept_scores"][0].float().cpu()
        n = number_option(request, "top_concepts", self._config["top_concepts"], int, 0)
        level = number_option(request, "level", self._config["level"], float, 0.01, 0.99)
        lab = np.zeros((H, W), np.uint8)
        names, regions = {}, []
        for idx, ci in enumerate(torch.argsort(-cscore)[:n].tolist(), 1):
            cols = (model.proto_concept == ci).nonzero().flatten()
            if not len(cols) or cscore[ci] <= 0:
                continue
            j = int(cols[out["proto_scores"][0, cols].argmax()])
            m = model.evidence_maps(out["sim_maps"][0, j], out["importance"][0, 0]).float()
            up = F.interpolate(m[None, None].cpu(), size=(H, W), mode="bilinear", align_corners=False)[0, 0].numpy()
            region = (up >= level * up.max()) & (lab == 0)
            if not region.any():
                continue
            lab[region] = idx
            name = f"{model.concepts[ci]} {float(cscore[ci]):.2f}"
            names[name] = idx
            ys, xs = np.nonzero(region)
            regions.append({"concept": model.concepts[ci], "score": round(float(cscore[ci]), 4), "label": idx,
                            "box": [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1],
                            "prototype_id": int(model.proto_ids[j])})
        return place_2d(lab, image.spatial_shape, k), {"label_names": names, "regions": regions,
                                                        **({"slice": k} if k is not None else {})}


class PromptClassifyInfer(ClinlensInfer):
    """ClinCoCoOp classification (methods.md §3) with its per-image concept weights α as the explanation."""

    def __init__(self, prompts: LazyFamilyModel):
        super().__init__(type=InferType.CLASSIFICATION, labels=[], dimension=2,
                         description="Concept-weighted prompt learning (ClinCoCoOp): class and concept weights",
                         config={})
        self.prompts = prompts

    def run(self, request, image):
        t0 = time.perf_counter()
        p = parse_prompts(request, image.size_ijk, dimension=2)
        plane = slice_2d(image.array, p.slice, image.is_rgb)
        model = self.prompts.get(family_of(image))
        bundle = self.prompts.clip.get()
        with torch.no_grad():
            out = model(bundle.pixel_values(to_unit_rgb(plane)))
        probs = out["probs"][0].float().cpu().numpy()
        alpha = out["alpha"][0].float().cpu().numpy()
        order = np.argsort(-probs)
        classes = [{"class": model.classes[i], "probability": round(float(probs[i]), 4)} for i in order]
        weights = sorted(({"concept": c, "alpha": round(float(a), 4)} for c, a in zip(model.concepts, alpha) if a > 0),
                         key=lambda d: -d["alpha"])  # empty for a class without findings ('normal')
        result = {"label_names": {f"{classes[0]['class']} {classes[0]['probability']:.2f}": 1}, "classes": classes,
                  "concept_weights": weights, "latencies": {"model_ms": round(1000 * (time.perf_counter() - t0), 1)}}
        return place_2d(frame_mask(plane.shape[:2]), image.spatial_shape, p.slice), result
