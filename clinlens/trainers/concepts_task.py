"""`concepts` MONAI Label train task: a thin adapter over `train_csr`.

What it learns from, per datastore image:
- concept labels and the class from the image info (`concepts`: {name: 0/1}, `diagnosis`), where
  the active-learning loop and the viewers' feedback store them;
- `final` label segments named after a concept (a Slicer segment named "pigment network", or any
  name `canonical_name` maps onto it): the concept is present and the drawn region is its local
  concept vector (stage 2, directly);
- the stored clinician feedback (`clinlens.activelearning.feedback`): rejected concepts are
  negatives (they win over a drawn region), a corrected class replaces the diagnosis, and pruned
  prototypes are removed at every retraining.
Each image family present is trained (continuing from its current model; with images that carry a
class, its ClinCoCoOp prompt learner too) and published atomically to `model_dir`, which inference
reloads. `prune` ({family: [prototype ids]}) removes prototypes and refits the task head: the
train-time atlas pruning. `prune_firing_on` (a segment name such as "text marker", drawn on a few
images where an artefact sits) prunes the prototypes that fire on it in more than `fire_share` of
those images (firing-map pruning, `CSRModel.prototypes_firing_on`). `region_weight` reweights the drawn
regions' patch supervision (`CSRModel.region_loss`; empty keeps the model's own, 1 when shipped).
`backbone`: "keep" trains the model as it is (the shipped ones on the frozen CLIP); "fine-tune" gives it
its own copy of the CLIP vision tower, trained at `backbone_lr` and saved with it from then on.
"""
from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from clinlens.activelearning.feedback import FEEDBACK_KEY, canonical_name, pruned_by_family
from clinlens.data.conventions import choice_option, number_option
from clinlens.data.image_io import load_image, to_unit_rgb
from clinlens.infer.base import family_of
from clinlens.trainers.concepts import CSR_FAMILIES, DEFAULTS, csr_file, train_csr
from clinlens.trainers.prompt_learning import prompt_file, train_prompt_learner
from clinlens.trainers.region_task import label_names
from clinlens.trainers.task import StatsTrainTask


def datastore_items(datastore, fallback_labels: dict, keep_region: str | None = None) -> dict[str, list]:
    """family -> [(image id, image, concepts, class, drawn regions)] from image info and final labels.

    Segments named after a concept are drawn regions of it; a segment named `keep_region` (any name,
    e.g. "text marker", case-insensitive) is kept under that name for firing-map pruning."""
    out = defaultdict(list)
    labelled = set(datastore.get_labeled_images())
    for i in datastore.list_images():
        info = datastore.get_image_info(i) or {}
        im = load_image(datastore.get_image_uri(i))
        if len(im.spatial_shape) != 2:
            continue  # volumes: a chosen slice at inference; training takes 2D images
        fam = family_of(im)
        vocab = CSR_FAMILIES[fam][0]
        concepts = {k: int(v) for k, v in (info.get("concepts") or {}).items() if k in vocab}
        drawn = {}
        if i in labelled:
            lab = np.squeeze(load_image(datastore.get_label_uri(i, "final")).array)
            for seg, idx in label_names(datastore.get_label_info(i, "final"), fallback_labels).items():
                name = canonical_name(seg, vocab)
                if name is not None and (lab == idx).any():
                    drawn[name] = lab == idx
                    concepts[name] = 1
                elif keep_region and seg.strip().lower() == keep_region and (lab == idx).any():
                    drawn[keep_region] = lab == idx
        fb = info.get(FEEDBACK_KEY) or {}
        for name in fb.get("reject_concepts", []):
            if name in vocab:
                concepts[name] = 0
                drawn.pop(name, None)
        dx = fb.get("corrected_class") or info.get("diagnosis")
        if concepts or drawn or dx:
            out[fam].append((i, to_unit_rgb(im.array), concepts, dx, drawn))
    return dict(out)


def stored_pruning(datastore, csr) -> dict[str, list[int]]:
    """Prototype ids pruned in the stored feedback that the current model of each family still has."""
    fams = []
    for i in datastore.list_images():
        info = datastore.get_image_info(i) or {}
        if (info.get(FEEDBACK_KEY) or {}).get("pruned_prototypes"):
            fams.append((family_of(load_image(datastore.get_image_uri(i))), info))
    out = {}
    for fam, ids in pruned_by_family(fams).items():
        path = csr.path(fam)
        have = set(csr.get(fam).proto_ids.tolist()) if path.is_file() else set()
        if set(ids) & have:
            out[fam] = sorted(set(ids) & have)
    return out


BACKBONE_CHOICES = ("keep", "fine-tune")


class ConceptsTrain(StatsTrainTask):
    def __init__(self, csr, labels: dict, prompts=None,
                 description="Train the concept (CSR) models and the prompt learners from feedback"):
        super().__init__(description, Path(csr.model_dir) / "concepts.train_stats.json")
        self.csr = csr  # clinlens.infer.concepts.LazyCSR
        self.prompts = prompts  # clinlens.infer.concepts.LazyPromptLearner (optional)
        self.labels = dict(labels)

    def config(self):
        return {"steps": 150, "batch": 16, "lr": 1e-3, "prune": {}, "prune_firing_on": "", "fire_share": 0.5,
                "region_weight": "", "backbone": list(BACKBONE_CHOICES), "backbone_lr": DEFAULTS["backbone_lr"]}

    def __call__(self, request, datastore):
        conf = self.options(request)
        prune = {f: [int(i) for i in ids] for f, ids in (conf["prune"] if isinstance(conf["prune"], dict) else {}).items()}
        firing_on = str(conf.get("prune_firing_on") or "").strip().lower() or None
        fire_share = number_option(conf, "fire_share", 0.5, float, 0, 0.999)
        # weight of the drawn regions' patch supervision; empty keeps each model's own (1 for the shipped ones)
        raw = conf.get("region_weight")
        keep = raw is None or str(raw).strip() == ""
        region_weight = None if keep else number_option(conf, "region_weight", None, float, 0, 100)
        tune = choice_option(conf, "backbone", BACKBONE_CHOICES[0], BACKBONE_CHOICES) == "fine-tune"
        backbone_lr = number_option(conf, "backbone_lr", DEFAULTS["backbone_lr"], float, 0, 1)
        per_family = datastore_items(datastore, self.labels, firing_on)
        if firing_on and not any(firing_on in it[4] for items in per_family.values() for it in items):
            raise ValueError(f"prune_firing_on: no final label has a segment named {firing_on!r}; draw it on the "
                             "images where the artefact sits and save them first")
        for fam, ids in stored_pruning(datastore, self.csr).items():  # feedback: pruned prototypes stay pruned
            prune[fam] = sorted(set(prune.get(fam, [])) | set(ids))
        if not per_family and not prune:
            raise ValueError("nothing to learn from: no image has concept labels, a diagnosis or a concept-named segment")
        bundle = self.csr.clip.get()
        start, summaries = time.time(), {}
        for fam in sorted(set(per_family) | set(prune)):
            items = per_family.get(fam, [])
            init = self.csr.path(fam)
            concepts, classes = CSR_FAMILIES[fam]
            if not items:
                raise ValueError(f"pruning {fam} prototypes needs {fam} images with labels to refit the head")
            summaries[fam] = train_csr(bundle, items, csr_file(self.csr.model_dir, fam), concepts, classes,
                                       steps=int(conf["steps"]), batch=int(conf["batch"]), lr=float(conf["lr"]),
                                       init=init if init.is_file() else None,
                                       prune=prune.get(fam, []),
                                       prune_firing_on=firing_on if any(firing_on in it[4] for it in items) else None,
                                       fire_share=fire_share,
                                       region_weight=region_weight, finetune_backbone=True if tune else None,
                                       backbone_lr=backbone_lr,
                                       extra={"source": "datastore", "family": fam})
            if self.prompts is not None and any(it[3] in classes for it in items):
                pinit = self.prompts.path(fam)
                summaries[f"{fam}_prompts"] = train_prompt_learner(
                    bundle, items, prompt_file(self.csr.model_dir, fam), concepts, classes, steps=int(conf["steps"]),
                    init=pinit if pinit.is_file() else None, extra={"source": "datastore", "family": fam})
        self.write_stats(status="DONE", total_time=f"{time.time() - start:.0f}s", families=summaries)
        return summaries


class PromptLearnerTrain(StatsTrainTask):
    """`prompt_learner`: few-shot ClinCoCoOp training from the images whose info carries a diagnosis
    (`shots` per class at most, 0 = all), continuing from the current learner of each family."""

    def __init__(self, prompts, labels: dict, description="Few-shot prompt learning (ClinCoCoOp) from labelled images"):
        super().__init__(description, Path(prompts.model_dir) / "prompt_learner.train_stats.json")
        self.prompts = prompts
        self.labels = dict(labels)

    def config(self):
        return {"steps": 150, "batch": 16, "lr": 2e-3, "shots": 0}

    def __call__(self, request, datastore):
        conf = self.options(request)
        shots = int(conf["shots"])
        bundle, start, summaries = self.prompts.clip.get(), time.time(), {}
        for fam, items in sorted(datastore_items(datastore, self.labels).items()):
            concepts, classes = CSR_FAMILIES[fam]
            items = [it for it in items if it[3] in classes]
            if shots > 0:
                per_class = defaultdict(list)
                for it in items:
                    per_class[it[3]].append(it)
                items = [it for group in per_class.values() for it in group[:shots]]
            if not items:
                continue
            init = self.prompts.path(fam)
            summaries[fam] = train_prompt_learner(bundle, items, prompt_file(self.prompts.model_dir, fam), concepts,
                                                  classes, steps=int(conf["steps"]), batch=int(conf["batch"]),
                                                  lr=float(conf["lr"]), init=init if init.is_file() else None,
                                                  extra={"source": "datastore", "family": fam, "shots": shots})
        if not summaries:
            raise ValueError("no image has a diagnosis in its info: nothing to learn prompts from")
        self.write_stats(status="DONE", total_time=f"{time.time() - start:.0f}s", families=summaries)
        return summaries
