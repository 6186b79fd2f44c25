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

import json
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from clinlens.activelearning.feedback import FEEDBACK_KEY, canonical_name, prototype_id_list, pruned_by_family
from clinlens.data.conventions import RequestError, choice_option, number_option
from clinlens.data.image_io import load_image, to_unit_rgb
from clinlens.infer.base import family_of
from clinlens.models import checkpoint
from clinlens.trainers.concepts import CSR_FAMILIES, DEFAULTS, csr_file, train_csr
from clinlens.trainers.prompt_learning import prompt_file, train_prompt_learner
from clinlens.trainers.region_task import label_names
from clinlens.trainers.task import StatsTrainTask


def family_concepts(csr, family: str) -> list[str]:
    """The concepts a family's current CSR model knows (`LazyCSR`; with any added by text), else the built-in
    ones. Read from the model's JSON sidecar: no model load."""
    info = checkpoint.summary(csr.path(family))
    return list(info["config"]["concepts"] if info else CSR_FAMILIES[family][0])


def datastore_items(datastore, fallback_labels: dict, keep_region: str | None = None,
                    skipped: list | None = None, vocab: dict | None = None) -> dict[str, list]:
    """family -> [(image id, image, concepts, class, drawn regions)] from image info and final labels.

    Segments named after a concept are drawn regions of it; a segment named `keep_region` (any name,
    e.g. "text marker", case-insensitive) is kept under that name for firing-map pruning. A volume
    trains on one axial slice, as inference reads one: the slice with the most voxels of its
    concept-named segments (a one-slice volume, e.g. a DICOM radiograph, on its only slice). A volume
    with no such segment says nothing about where its concepts are; its id goes to `skipped`. A volume's
    info labels (`concepts`, `diagnosis`) are the study's and go with the slice taken.
    `vocab`: family -> concept names (default: the built-in ones, `CSR_FAMILIES`)."""
    out = defaultdict(list)
    labelled = set(datastore.get_labeled_images())
    for i in datastore.list_images():
        info = datastore.get_image_info(i) or {}
        im = load_image(datastore.get_image_uri(i))
        fam = family_of(im)
        names = (vocab or {}).get(fam) or CSR_FAMILIES[fam][0]
        concepts = {k: int(v) for k, v in (info.get("concepts") or {}).items() if k in names}
        plane, lab, segs, marker = im.array, None, {}, {}
        if i in labelled:
            lab = load_image(datastore.get_label_uri(i, "final")).array
            for seg, idx in label_names(datastore.get_label_info(i, "final"), fallback_labels).items():
                name = canonical_name(seg, names)
                if name is not None:
                    segs[name] = idx
                elif keep_region and seg.strip().lower() == keep_region:
                    marker[keep_region] = idx
        if len(im.spatial_shape) == 3:
            if lab is not None and lab.shape != im.spatial_shape:
                lab = None  # not this volume's labelmap: nothing can be read off it
            if im.spatial_shape[0] == 1:
                k = 0
            else:
                per_slice = np.isin(lab, list(segs.values())).sum((1, 2)) if lab is not None and segs else np.zeros(1)
                if not per_slice.any():
                    if skipped is not None:
                        skipped.append(i)
                    continue
                k = int(per_slice.argmax())
            plane, lab = plane[k], None if lab is None else lab[k]
        elif lab is not None:
            lab = np.squeeze(lab)
        drawn = {}
        for name, idx in {**marker, **segs}.items():
            if lab is not None and (lab == idx).any():
                drawn[name] = lab == idx
                if name in segs:
                    concepts[name] = 1
        fb = info.get(FEEDBACK_KEY) or {}
        for name in fb.get("reject_concepts", []):
            if name in names:
                concepts[name] = 0
                drawn.pop(name, None)
        dx = fb.get("corrected_class") or info.get("diagnosis")
        if concepts or drawn or dx:
            out[fam].append((i, to_unit_rgb(plane), concepts, dx, drawn))
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


def _per_family(raw, key: str, what: str, example: str) -> dict:
    """A train option {family: ...} (a dict, or its JSON text as Slicer's option field sends it; empty: {})
    with known families, or a RequestError naming `key`."""
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return {}
    given = raw
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except ValueError:
            raw = None
    if not isinstance(raw, dict):
        raise RequestError(f"'{key}' must be {{family: {what}}} (JSON), e.g. {example}; got {given!r}")
    bad = [f for f in raw if f not in CSR_FAMILIES]
    if bad:
        raise RequestError(f"'{key}': unknown image family {bad[0]!r}; families: {list(CSR_FAMILIES)}")
    return raw


def parse_prune(raw, csr) -> dict[str, list[int]]:
    """The train option `prune`: {family: [prototype ids]} (`_per_family`), each id one the family's current
    model (`LazyCSR`) has -> the same, or a RequestError."""
    out = {}
    for fam, ids in _per_family(raw, "prune", "[prototype ids]", '{"derm": [3, 7]}').items():
        if not csr.path(fam).is_file():
            raise RequestError(f"'prune': there is no {fam} concept model to prune yet", status=409)
        out[fam] = prototype_id_list([ids] if isinstance(ids, int) and not isinstance(ids, bool) else ids,
                                     f"prune.{fam}", csr.get(fam).proto_ids.tolist())
    return {f: ids for f, ids in out.items() if ids}


def parse_add_concepts(raw, csr) -> dict[str, list[tuple[str, str | None]]]:
    """The train option `add_concepts`: {family: [name, or {"name": ..., "description": ...}]} (`_per_family`)
    -> {family: [(name, description)]}, lower-case names new to the family's model; a name the model
    already knows is left out (the option may be sent again with the next training). RequestError otherwise."""
    out = {}
    for fam, entries in _per_family(raw, "add_concepts", '[names or {"name": ..., "description": ...}]',
                                    '{"derm": ["regression structures"]}').items():
        known = set(family_concepts(csr, fam))
        new = {}
        for e in entries if isinstance(entries, list) else [entries]:
            name, desc = (e, None) if isinstance(e, str) else ((e.get("name"), e.get("description"))
                                                               if isinstance(e, dict) else (None, None))
            if not isinstance(name, str) or not name.strip() or not (desc is None or isinstance(desc, str)):
                raise RequestError(f"'add_concepts.{fam}': each entry is a name or {{\"name\": ..., "
                                   f"\"description\": ...}} of text, got {e!r}")
            name = " ".join(name.lower().split())
            if name not in known:
                new[name] = (desc or "").strip() or None
        if new:
            out[fam] = list(new.items())
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
        return {"steps": 150, "batch": 16, "lr": 1e-3, "prune": {}, "add_concepts": {}, "prune_firing_on": "", "fire_share": 0.5,
                "region_weight": "", "backbone": list(BACKBONE_CHOICES), "backbone_lr": DEFAULTS["backbone_lr"]}

    def parse(self, request: dict) -> dict:
        """The request's options, checked before any work (the server calls it before starting training,
        so a bad option is a 4xx there): a RequestError names the first bad one."""
        conf = self.options(request)
        # weight of the drawn regions' patch supervision; empty keeps each model's own (1 for the shipped ones)
        raw = conf.get("region_weight")
        keep = raw is None or str(raw).strip() == ""
        return {"steps": number_option(conf, "steps", 150, int, 1), "batch": number_option(conf, "batch", 16, int, 1),
                "lr": number_option(conf, "lr", 1e-3, float, 0, 1),
                "prune": parse_prune(conf["prune"], self.csr),
                "add_concepts": parse_add_concepts(conf["add_concepts"], self.csr),
                "firing_on": str(conf.get("prune_firing_on") or "").strip().lower() or None,
                "fire_share": number_option(conf, "fire_share", 0.5, float, 0, 0.999),
                "region_weight": None if keep else number_option(conf, "region_weight", None, float, 0, 100),
                "tune": choice_option(conf, "backbone", BACKBONE_CHOICES[0], BACKBONE_CHOICES) == "fine-tune",
                "backbone_lr": number_option(conf, "backbone_lr", DEFAULTS["backbone_lr"], float, 0, 1)}

    def __call__(self, request, datastore):
        return self.run_reporting(self._train, request, datastore)

    def _train(self, start, request, datastore):
        conf = self.parse(request)
        prune, firing_on, fire_share = conf["prune"], conf["firing_on"], conf["fire_share"]
        region_weight, tune, backbone_lr = conf["region_weight"], conf["tune"], conf["backbone_lr"]
        add = conf["add_concepts"]
        vocab = {f: family_concepts(self.csr, f) + [n for n, _ in add.get(f, [])] for f in CSR_FAMILIES}
        skipped = []
        per_family = datastore_items(datastore, self.labels, firing_on, skipped, vocab)
        for fam, new in add.items():  # a concept added by text learns from where a clinician has shown it
            missing = [n for n, _ in new if not any(it[2].get(n) == 1 for it in per_family.get(fam, []))]
            if missing:
                raise ValueError(f"add_concepts: no {fam} image shows {missing}: name a segment after it (or set "
                                 "it to 1 in an image's info 'concepts') on the images where it is, and save them")
        if firing_on and not any(firing_on in it[4] for items in per_family.values() for it in items):
            raise ValueError(f"prune_firing_on: no final label has a segment named {firing_on!r}; draw it on the "
                             "images where the artefact sits and save them first")
        for fam, ids in stored_pruning(datastore, self.csr).items():  # feedback: pruned prototypes stay pruned
            prune[fam] = sorted(set(prune.get(fam, [])) | set(ids))
        if not per_family and not prune:
            raise ValueError("nothing to learn from: no image has concept labels, a diagnosis or a concept-named segment"
                             + (f"; {len(skipped)} volume(s) have no concept-named segment to choose a slice by"
                                if skipped else ""))
        bundle = self.csr.clip.get()
        summaries, todo = {}, sorted(set(per_family) | set(prune))
        for n, fam in enumerate(todo):
            items = per_family.get(fam, [])
            init = self.csr.path(fam)
            concepts, classes = CSR_FAMILIES[fam]
            if not items:
                raise ValueError(f"pruning {fam} prototypes needs {fam} images with labels to refit the head")
            summaries[fam] = train_csr(bundle, items, csr_file(self.csr.model_dir, fam), concepts, classes,
                                       add_concepts=add.get(fam, ()),
                                       steps=conf["steps"], batch=conf["batch"], lr=conf["lr"],
                                       init=init if init.is_file() else None,
                                       prune=prune.get(fam, []),
                                       prune_firing_on=firing_on if any(firing_on in it[4] for it in items) else None,
                                       fire_share=fire_share,
                                       region_weight=region_weight, finetune_backbone=True if tune else None,
                                       backbone_lr=backbone_lr,
                                       extra={"source": "datastore", "family": fam},
                                       on_step=self.step_reporter(start, conf["steps"], family=fam,
                                                                  family_index=n + 1, families=len(todo)))
            if self.prompts is not None and any(it[3] in classes for it in items):
                pinit = self.prompts.path(fam)
                summaries[f"{fam}_prompts"] = train_prompt_learner(
                    bundle, items, prompt_file(self.csr.model_dir, fam), concepts, classes, steps=conf["steps"],
                    init=pinit if pinit.is_file() else None, extra={"source": "datastore", "family": fam})
        if skipped:
            summaries["skipped_volumes"] = skipped  # no concept-named segment to choose their slice by
        self.write_stats(status="DONE", start_ts=int(start), total_time=f"{time.time() - start:.0f}s", families=summaries)
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

    def parse(self, request: dict) -> dict:
        """The request's options, checked before any work (a RequestError names the first bad one)."""
        conf = self.options(request)
        return {"steps": number_option(conf, "steps", 150, int, 1), "batch": number_option(conf, "batch", 16, int, 1),
                "lr": number_option(conf, "lr", 2e-3, float, 0, 1), "shots": number_option(conf, "shots", 0, int, 0)}

    def __call__(self, request, datastore):
        return self.run_reporting(self._train, request, datastore)

    def _train(self, start, request, datastore):
        conf = self.parse(request)
        shots = conf["shots"]
        bundle, summaries = self.prompts.clip.get(), {}
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
                                                  classes, steps=conf["steps"], batch=conf["batch"],
                                                  lr=conf["lr"], init=init if init.is_file() else None,
                                                  extra={"source": "datastore", "family": fam, "shots": shots})
        if not summaries:
            raise ValueError("no image has a diagnosis in its info: nothing to learn prompts from")
        self.write_stats(status="DONE", start_ts=int(start), total_time=f"{time.time() - start:.0f}s", families=summaries)
        return summaries
