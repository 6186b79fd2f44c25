"""MONAI Label adapters for active learning: scoring methods and strategies over `selection`.

Scoring methods run as MONAI Label runs them (`/scoring/<name>`, in the background after training
and at start-up) and store one value per image in its info:
- `region_uncertainty` (`IMAGE_KEYS["region"]`): 1 − mean pairwise Dice of the region model under
  prompt jitter, self-prompted (`selection.region_uncertainty`);
- `concept_ambiguity` (`"concept_margin"`, `"class_entropy"`): the CSR top-2 class margin (ambiguous
  below 0.3) and the normalised class entropy;
- `diversity` (`"clip_embedding"`): the CLIP image embedding the k-center core-set runs on.
A volume is scored on its middle axial slice (`conventions.slice_2d`).

Strategies (`/activelearning/<name>`) rank the images without a `final` label with
`selection.rank`: uncertainty, ambiguity, diversity, hybrid. Images not scored yet rank last for
uncertainty and ambiguity; diversity uses the images that have an embedding.
"""
from __future__ import annotations

import logging
import time

import numpy as np
import torch
from monailabel.interfaces.tasks.scoring import ScoringMethod
from monailabel.interfaces.tasks.strategy import Strategy

from clinlens.activelearning.selection import concept_margin, predictive_entropy, rank, region_uncertainty
from clinlens.data.conventions import slice_2d
from clinlens.data.image_io import load_image, to_unit_rgb
from clinlens.infer.base import family_of

logger = logging.getLogger(__name__)

IMAGE_KEYS = {"region": "region_uncertainty", "margin": "concept_margin", "entropy": "class_entropy",
              "embedding": "clip_embedding"}


def _planes(datastore, only_unlabelled: bool = True):
    """(image id, family, unit RGB plane) for the images to score."""
    labelled = set(datastore.get_labeled_images()) if only_unlabelled else set()
    for i in sorted(datastore.list_images()):
        if i in labelled:
            continue
        im = load_image(datastore.get_image_uri(i))
        yield i, family_of(im), to_unit_rgb(slice_2d(im.array, None, im.is_rgb))


class _Scoring(ScoringMethod):
    what = ""

    def score(self, image_id: str, family: str, plane: np.ndarray) -> dict:
        raise NotImplementedError

    def __call__(self, request, datastore):
        start, done, failed = time.time(), 0, {}
        with torch.no_grad():
            for i, fam, plane in _planes(datastore, str(request.get("unlabelled_only", True)).lower() == "true"):
                try:
                    values = self.score(i, fam, plane)
                except Exception as e:  # noqa: BLE001 (one image, e.g. no model for its family): report, go on
                    failed[i] = str(e)
                    continue
                datastore.update_image_info(i, values)
                done += 1
        logger.info(f"{self.what}: scored {done} images in {time.time() - start:.1f}s; failed {failed or 'none'}")
        return {"scored": done, "failed": failed, "seconds": round(time.time() - start, 1)}


class RegionUncertaintyScoring(_Scoring):
    what = "region_uncertainty"

    def __init__(self, region, n: int = 6, jitter_px: float = 4):
        super().__init__("Region-model disagreement under prompt jitter (1 - mean pairwise Dice)")
        self.region, self.n, self.jitter_px = region, n, jitter_px

    def score(self, image_id, family, plane):
        u = region_uncertainty(self.region.get(), plane, ("scoring", image_id), None, n=self.n, jitter_px=self.jitter_px)
        return {IMAGE_KEYS["region"]: round(float(u), 5)}


class ConceptAmbiguityScoring(_Scoring):
    what = "concept_ambiguity"

    def __init__(self, csr):
        super().__init__("CSR top-2 class margin (ambiguous below 0.3) and class entropy")
        self.csr = csr

    def score(self, image_id, family, plane):
        model = self.csr.get(family)
        probs = model(self.csr.clip.get().pixel_values(plane, model.image_size))["logits"].softmax(-1).cpu().numpy()
        return {IMAGE_KEYS["margin"]: round(float(concept_margin(probs)[0]), 5),
                IMAGE_KEYS["entropy"]: round(float(predictive_entropy(probs)[0]), 5)}


class DiversityScoring(_Scoring):
    what = "diversity"

    def __init__(self, clip):
        super().__init__("CLIP image embeddings for the k-center core-set")
        self.clip = clip

    def score(self, image_id, family, plane):
        bundle = self.clip.get()
        emb = bundle.encode_images(bundle.pixel_values(plane))[0].cpu().numpy()
        return {IMAGE_KEYS["embedding"]: [round(float(v), 5) for v in emb]}


class RankStrategy(Strategy):
    """One of `selection.STRATEGIES` (not random: MONAI Label's own `Random` serves that)."""

    def __init__(self, name: str, description: str):
        super().__init__(description)
        self.name = name

    def __call__(self, request, datastore):
        ids = sorted(datastore.list_images())
        if not ids:
            return {}
        labelled = set(datastore.get_labeled_images())
        infos = [datastore.get_image_info(i) or {} for i in ids]
        mask = np.array([i in labelled for i in ids])
        get = lambda key: np.array([float(f.get(key, np.nan)) for f in infos])  # noqa: E731
        scores = {"uncertainty": get(IMAGE_KEYS["region"]), "margin": get(IMAGE_KEYS["margin"])}
        emb = None
        if self.name in ("diversity", "hybrid"):
            have = np.array([IMAGE_KEYS["embedding"] in f for f in infos])
            if self.name == "diversity" or have.all():
                if not have.any():
                    raise ValueError("no image has a CLIP embedding yet: run the 'diversity' scoring method")
                keep = np.flatnonzero(have)  # diversity over the embedded images only
                ids, mask, infos = [ids[j] for j in keep], mask[keep], [infos[j] for j in keep]
                scores = {k: v[keep] for k, v in scores.items()}
                emb = np.array([f[IMAGE_KEYS["embedding"]] for f in infos], np.float32)
        picked = rank(self.name, scores, 1, mask, embeddings=emb)
        if not picked:
            return {}
        j = picked[0]
        info = infos[j]
        return {"id": ids[j], "strategy": self.name,
                **{k: info[v] for k, v in IMAGE_KEYS.items() if k != "embedding" and v in info}}


def strategies() -> dict:
    from monailabel.tasks.activelearning.random import Random

    return {"random": Random(),
            "uncertainty": RankStrategy("uncertainty", "Highest region-model disagreement first"),
            "ambiguity": RankStrategy("ambiguity", "Lowest CSR top-2 class margin first (the cases to ask a doctor)"),
            "diversity": RankStrategy("diversity", "k-center core-set over CLIP image embeddings"),
            "hybrid": RankStrategy("hybrid", "Uncertainty and ambiguity ranks averaged, then k-center among the top")}


def scoring_methods(region, csr, clip) -> dict:
    return {"region_uncertainty": RegionUncertaintyScoring(region), "concept_ambiguity": ConceptAmbiguityScoring(csr),
            "diversity": DiversityScoring(clip)}
