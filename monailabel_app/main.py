"""The clinlens MONAI Label app: thin wiring of clinlens tasks into MONAI Label.

Start it with `python -m monailabel.main start_server --app monailabel_app --studies DIR`
(or `clinlens serve`). Models load lazily: the training subprocess rebuilds this app.
`--conf clip_model DIR` (or $CLINLENS_CLIP_MODEL) points at any local Hugging Face CLIP directory;
`--conf model_dir DIR` is where training publishes (default `<app>/model`).
"""
from __future__ import annotations

import logging
import os

from fastapi import Body, Depends, HTTPException
from monailabel.config import settings
from monailabel.endpoints.user.auth import RBAC, User
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.tasks.infer_v2 import InferType

import clinlens
from clinlens.activelearning.feedback import FEEDBACK_KEY, SEGMENTS_KEY, feedback_checker
from clinlens.activelearning.strategies import scoring_methods, strategies
from clinlens.data.phantoms import CHEST_FINDINGS, CT_FINDINGS, DERM_CONCEPTS, DERM_DIAGNOSES
from clinlens.data.studies import LABELS
from clinlens.infer.batch import ClinlensBatchInfer
from clinlens.infer.concepts import (ConceptRegionsInfer, ConceptsInfer, LazyCSR, LazyPromptLearner,
                                     PromptClassifyInfer)
from clinlens.infer.datastore import CheckedLocalDatastore, ClinlensDICOMWebDatastore, save_result
from clinlens.infer.explain import ExplainInfer
from clinlens.infer.region import LazyRegion, RegionSeg3DInfer, RegionSegInfer, TextSegInfer
from clinlens.infer.zeroshot import ZeroShotInfer
from clinlens.models.clip import LazyClip
from clinlens.trainers.concepts_task import ConceptsTrain, PromptLearnerTrain
from clinlens.trainers.negation_task import NegationTrain
from clinlens.trainers.region_task import RegionSegTrain

logger = logging.getLogger(__name__)

# what each kind of image is scored against ("what is here", zero-shot, text_seg's option box)
VOCAB = {"chest": CHEST_FINDINGS, "derm": DERM_CONCEPTS + DERM_DIAGNOSES, "ct": CT_FINDINGS}
NEGATION_DIR = "clip_negation"
# every finding and concept a saved segment name can map onto
NAMES = tuple(dict.fromkeys([*LABELS, *(n for names in VOCAB.values() for n in names)]))


class MyApp(MONAILabelApp):
    def __init__(self, app_dir, studies, conf):
        self.model_dir = os.path.realpath(conf.get("model_dir") or os.path.join(app_dir, "model"))
        self.negation_dir = os.path.join(self.model_dir, NEGATION_DIR)  # the `negation` task's text-tuned CLIP
        self.clip = LazyClip(conf, text_dir=self.negation_dir)
        self.region = LazyRegion(self.clip, os.path.join(self.model_dir, "region.safetensors"))
        self.csr = LazyCSR(self.clip, self.model_dir)
        self.prompts = LazyPromptLearner(self.clip, self.model_dir)
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="clinlens",
            description="Region-aware, concept-explained, negation-aware CLIP",
            version=clinlens.__version__,
            labels=dict(LABELS),
        )

    def init_datastore(self):
        if self.studies.startswith(("http://", "https://")):
            ds = super().init_datastore()
            if type(ds).__name__ != "DICOMWebDatastore":  # XNAT / DSA: as MONAI Label has them
                return ds
            cache = (settings.MONAI_LABEL_DICOMWEB_CACHE_PATH or "").strip() or None
            return ClinlensDICOMWebDatastore(ds._client, ds._search_filter, cache, ds._fetch_by_frame,
                                             ds._convert_to_nifti)
        return CheckedLocalDatastore(
            self.studies,
            extensions=settings.MONAI_LABEL_DATASTORE_FILE_EXT,
            auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
            read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY,
            vocabulary=NAMES,
            feedback_check=feedback_checker(self.csr),
        )

    def _download_dcmqi_tools(self):
        """Offline: no dcmqi download; DICOM SEG is written by highdicom (ClinlensDICOMWebDatastore)."""
        logger.info("DICOMweb datastore: DICOM SEG is written with highdicom; dcmqi is not needed")

    def init_infers(self):
        labels = dict(LABELS)
        return {
            "region_seg": RegionSegInfer(self.region, VOCAB, labels),
            "region_seg_3d": RegionSeg3DInfer(self.region, VOCAB, labels),
            "text_seg": TextSegInfer(self.region, VOCAB, labels),
            "zeroshot": ZeroShotInfer(self.clip, VOCAB),
            "concepts": ConceptsInfer(self.csr),
            "concept_regions": ConceptRegionsInfer(self.csr),
            "prompt_classify": PromptClassifyInfer(self.prompts),
            "explain": ExplainInfer(self.clip, list(dict.fromkeys(n for names in VOCAB.values() for n in names))),
        }

    def init_strategies(self):
        return strategies()

    def init_scoring_methods(self):
        return scoring_methods(self.region, self.csr, self.clip)

    def init_batch_infer(self):
        return ClinlensBatchInfer()

    def init_trainers(self):
        return {"region_seg": RegionSegTrain(self.clip, self.region.publish_path, dict(LABELS)),
                "concepts": ConceptsTrain(self.csr, dict(LABELS), self.prompts),
                "prompt_learner": PromptLearnerTrain(self.prompts, dict(LABELS)),
                "negation": NegationTrain(self.clip, self.negation_dir)}

    def infer(self, request, datastore=None):
        model = request.get("model")
        if model not in self._infers:
            raise HTTPException(404, f"unknown model '{model}'; available: {sorted(self._infers)}")
        image = request.get("image")
        if not image:
            raise HTTPException(400, "no image id given (?image=<id>)")
        if isinstance(image, str) and not os.path.exists(image):
            ds = datastore or self.datastore()
            uri = ds.get_image_uri(image)
            if not uri:
                raise HTTPException(404, f"image '{image}' is not in the datastore")
        res = super().infer(request, datastore)
        # /batch/infer: stock MONAI Label keeps a result only as a label file's info; classification
        # results (and any result without a file) also go into the image info, where they can be read
        if (request.get("save_label") and isinstance(image, str) and not os.path.exists(image)
                and res.get("params") is not None
                and (not res.get("file") or self._infers[model].type == InferType.CLASSIFICATION)):
            save_result(datastore or self.datastore(), image, model, res["params"], request.get("label_tag", "original"))
        return res

    def on_save_label(self, image_id, label_id):
        """Save Label's answer: how the segment names mapped, the image's stored feedback, and
        whether `auto_train_after` new final labels started training (`auto_train_models`, a comma
        list; default all train tasks)."""
        super().on_save_label(image_id, label_id)
        ds = self.datastore()
        seg = (ds.get_label_info(image_id, "final") or {}).get(SEGMENTS_KEY) or {}
        res = {"segments": seg.get("segments", []), "unknown_segments": seg.get("unknown", []),
               "feedback": (ds.get_image_info(image_id) or {}).get(FEEDBACK_KEY)}
        every = int(self.conf.get("auto_train_after", 0) or 0)
        if every > 0:
            n = len(ds.get_labeled_images())
            if n - self._labels_at_train >= every:
                self._labels_at_train = n
                models = [m.strip() for m in str(self.conf.get("auto_train_models", "")).split(",") if m.strip()]
                models = [m for m in models if m in self._trainers] or list(self._trainers)
                self.async_training(models, enqueue=True)
                res["auto_train"] = models
        return res

    def on_init_complete(self):
        super().on_init_complete()
        from monailabel.app import app as fastapi_app

        from clinlens.infer.http import install_error_handlers

        install_error_handlers(fastapi_app)
        self._labels_at_train = len(self.datastore().get_labeled_images())  # for auto_train_after

        def put_feedback(image: str, feedback: dict = Body(...)):
            """Structured feedback for one image (rejected concepts, boxes, corrected class, pruned prototypes)."""
            ds = self.datastore()
            if not hasattr(ds, "save_feedback"):
                raise HTTPException(501, f"{type(ds).__name__} does not store feedback")
            return {"image": image, "feedback": ds.save_feedback(image, feedback)}

        if not any(getattr(r, "path", None) == "/feedback" for r in fastapi_app.routes):
            fastapi_app.add_api_route("/feedback", put_feedback, methods=["PUT"], summary="Save clinician feedback")
        self._check_train_options_first(fastapi_app)

    def _check_train_options_first(self, fastapi_app):
        """POST /train/<model>: a task with `parse(params)` checks its options before MONAI Label starts the
        training subprocess, so a bad option is a 4xx naming it, not an ERROR status after the work. The
        route goes in front of upstream's and hands everything on to it (same parameters and role); a plain
        `def`, so FastAPI runs it in a worker thread (`parse` may load a model) and the server keeps answering."""
        from monailabel.endpoints import train as train_api

        def train_model(model: str, params: dict | None = Body(None), run_sync: bool | None = False,
                        enqueue: bool | None = False, user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ADMIN))):
            parse = getattr(self._trainers.get(model), "parse", None)
            if parse is not None:
                parse(params or {})
            return train_api.run_model(model, params, run_sync, enqueue)

        routes = fastapi_app.router.routes  # the first matching route wins, so this one goes first
        if not any(getattr(getattr(r, "endpoint", None), "__name__", "") == "train_model" for r in routes):
            fastapi_app.add_api_route("/train/{model}", train_model, methods=["POST"], include_in_schema=False)
            routes.insert(0, routes.pop())
