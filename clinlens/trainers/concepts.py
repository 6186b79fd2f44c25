"""Training of the CSR concept model (methods.md §2): stages 1-4 on cached frozen patch features,
then the prototype atlas; optional prototype pruning with a refit of the task head.

- Items: (image id, float image [H, W, 3] in [0, 1], concept labels {name: 0/1}, class name or None,
  drawn regions {concept: bool mask [H, W]}). A drawn region is the concept's local vector directly
  (stage 2), the most direct way a clinician's segment feeds training.
- One CSR model per image family (`csr_<family>.safetensors` beside the region model): derm
  (dermoscopic concepts -> diagnosis), chest (findings -> diagnosis), ct (findings on an axial slice
  -> diagnosis).
- The backbone is the frozen CLIP (features cached once), or, for a model made with
  `finetune_backbone=True`, its own copy trained with the rest at `backbone_lr` (pixels cached, the
  features recomputed every step; with `tuned_blocks` k, the output of the frozen blocks is cached and
  only the last k run every step); CUDA with bf16 autocast when available.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from clinlens.data.image_io import to_unit_rgb
from clinlens.data.phantoms import (CHEST_DIAGNOSES, CHEST_FINDINGS, CT_DIAGNOSES, CT_FINDINGS, DERM_CONCEPTS,
                                    DERM_DIAGNOSES, make_chest, make_ct, make_derm)
from clinlens.models import checkpoint
from clinlens.models.csr import CSRModel

CSR_FAMILIES = {"derm": (DERM_CONCEPTS, DERM_DIAGNOSES), "chest": (CHEST_FINDINGS, CHEST_DIAGNOSES),
                "ct": (CT_FINDINGS, CT_DIAGNOSES)}
DEFAULTS = dict(steps=300, batch=32, lr=3e-3, n_images=240, backbone_lr=1e-4)
# per-family settings of the shipped models, chosen on validation phantoms (benchmarks/results/concepts_backbone.md):
# chest findings are small (a nodule is ~0.1% of the image), and a 42x42 patch grid (672 px) points at them better
SHIPPED = {"chest": dict(input_size=672)}


def csr_file(model_dir, family: str) -> Path:
    return Path(model_dir) / f"csr_{family}.safetensors"


def shipped_training_record(model_dir, family: str, n_images: int = DEFAULTS["n_images"]) -> dict | None:
    """The training record (from its JSON summary) of the CSR file of `family` in `model_dir` when it is the
    training `train_concept_models_default` gives it today (`n_images` phantoms, seed 0, default steps, `SHIPPED`
    settings, unpruned); None otherwise."""
    info = checkpoint.summary(csr_file(model_dir, family))
    if not info:
        return None
    rec, cfg = info.get("training", {}), info.get("config", {})
    base = {"input_size": 224, "finetune_backbone": False}  # older files have no input_size
    have = {**base, **cfg, **{k: rec[k] for k in ("backbone_lr",) if k in rec}}
    same = (rec.get("command") == "clinlens train-default --concepts-only" and rec.get("images") == n_images
            and rec.get("seed") == 0 and rec.get("steps") == DEFAULTS["steps"] and not rec.get("pruned")
            and all(have.get(k) == v for k, v in {**base, **SHIPPED.get(family, {})}.items()))
    return rec if same else None


def phantom_concept_items(family: str, seed: int, n: int, size: int = 224, drawn: bool = False) -> list[tuple]:
    """`n` phantom items of a family (CT: the axial slice through the most finding voxels). With `drawn`,
    each item's drawn-region dict holds the masks of its present concepts, as a clinician's named
    segments would (the shipped CSR models train on them)."""
    items = []
    for i in range(n):
        s_seed = seed * 1_000_003 + 500_000 + i
        if family == "derm":
            s = make_derm(s_seed, size=size)
            img = to_unit_rgb(s.image)
            concepts = dict(s.concepts)
        elif family == "chest":
            s = make_chest(s_seed, size=size)
            img = to_unit_rgb(s.image)
            concepts = dict(s.concepts)
        elif family == "ct":
            s = make_ct(s_seed, shape=(32, size // 2, size // 2))
            total = sum((m for m in s.masks.values()), np.zeros(s.image.shape, bool))
            z = int(np.argmax(total.sum(axis=(1, 2)))) if total.any() else s.image.shape[0] // 2
            img = to_unit_rgb(s.image[z])
            concepts = {c: int(c in s.masks and bool(s.masks[c][z].any())) for c in CT_FINDINGS}
        else:
            raise ValueError(f"unknown family {family!r}; choose from {sorted(CSR_FAMILIES)}")
        regions = {}
        if drawn:
            masks = {c: (m[z] if family == "ct" else m) for c, m in s.masks.items()}
            regions = {c: masks[c] for c, on in concepts.items() if on and c in masks and masks[c].any()}
        items.append((f"{family}_phantom_{s_seed}", img, concepts, s.diagnosis, regions))
    return items


def pixel_batches(bundle, items, chunk: int = 32, size: int | None = None):
    """(image ids, normalised pixels (B, 3, S, S)) per chunk of items; any image size (pixel_values resizes
    to `size`, default the CLIP's input size)."""
    for i in range(0, len(items), chunk):
        part = items[i:i + chunk]
        yield [it[0] for it in part], torch.cat([bundle.pixel_values(it[1], size) for it in part])


def encode(model: CSRModel, pixels: torch.Tensor, chunk: int = 32, fn=None) -> torch.Tensor:
    """Patch features (N, D, h, w) on the CPU of normalised pixels (N, 3, S, S), in chunks, without gradients;
    `fn` (default `model.features`) maps a chunk instead, e.g. `model.trunk` or `model.features_from_trunk`."""
    fn = fn or model.features
    with torch.no_grad():
        return torch.cat([fn(pixels[i:i + chunk].to(model.device)).cpu() for i in range(0, len(pixels), chunk)])


def _features(bundle, model: CSRModel, items, chunk: int = 32) -> torch.Tensor:
    """Patch features (N, D, h, w) on the CPU of the items' images at the model input, without gradients."""
    with torch.no_grad():
        return torch.cat([model.features(pv).cpu() for _, pv in pixel_batches(bundle, items, chunk, model.image_size)])


def _tensors(bundle, model: CSRModel, items, chunk: int = 32):
    """Cached features, concept labels, class labels (-1 = none), drawn-region masks at the model input."""
    return (_features(bundle, model, items, chunk), *_targets(model, items))


def _targets(model: CSRModel, items):
    """Concept labels (N, K), class labels (N,) (-1 = none), drawn-region masks (N, K, S, S) at the model input."""
    K, S = len(model.concepts), model.image_size
    y, cls, regions = [], [], []
    for _, _, concepts, label, drawn in items:
        y.append([float(concepts.get(c, 0)) for c in model.concepts])
        cls.append(model.classes.index(label) if label in model.classes else -1)
        r = torch.zeros(K, S, S)
        for name, m in (drawn or {}).items():
            if name in model.concepts:
                mt = torch.as_tensor(np.asarray(m, np.float32))[None, None]
                r[model.concepts.index(name)] = F.interpolate(mt, size=(S, S), mode="area")[0, 0]
        regions.append(r)
    return torch.tensor(y), torch.tensor(cls), torch.stack(regions)


def _auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    vals = [roc_auc_score(labels[:, k], scores[:, k]) for k in range(labels.shape[1])
            if 0 < labels[:, k].sum() < len(labels)]
    return float(np.mean(vals)) if vals else float("nan")


def fit_csr(model: CSRModel, feats, y, cls, regions, steps: int, batch: int, lr: float, seed: int = 0, prune=(),
            progress: bool = False, fire=None, pixels: torch.Tensor | None = None,
            backbone_lr: float = DEFAULTS["backbone_lr"], on_step=None) -> tuple[list[dict], float | None, list[int], torch.Tensor]:
    """Stages 1-3 by gradient on cached features (Adam, cosine schedule, bf16 autocast on CUDA; class
    labels -1 = unknown), then any pruning, then stage 4 (the task head) refitted to convergence. `fire` = (indices of the
    images with the region, their region masks, share): the prototypes firing on the region in more
    than that share of them are pruned too. Returns (loss history, refit accuracy or None when no image
    has a class, the prototype ids pruned for firing on the region, the features scored: `feats`, or
    for a tuned backbone those it gives after training).

    A model with its own backbone (`finetune_backbone`) needs `pixels` (N, 3, S, S): each step encodes
    its batch and the backbone trains at `backbone_lr`; `feats` is not used, the scores after
    training come from features encoded anew. When only its last blocks train (`tuned_blocks`), the
    frozen trunk's hidden states are computed once and each step runs the tuned blocks alone.
    `on_step(step, loss)` is called after each step (1-based), e.g. to report progress."""
    from tqdm.auto import tqdm

    tune = bool(model.config["finetune_backbone"])
    if tune and pixels is None:
        raise ValueError("a CSR model with its own backbone trains on pixels, not cached features")
    model.train()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]  # a frozen tower is not among them
    opt = torch.optim.Adam([{"params": [p for n, p in named if not n.startswith("backbone.")], "lr": lr},
                            {"params": [p for n, p in named if n.startswith("backbone.")], "lr": backbone_lr}])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / max(steps, 1))))
    g = torch.Generator().manual_seed(seed)
    hist = []
    bar = tqdm(range(steps), desc="train-concepts", disable=not progress, mininterval=5)
    n = len(pixels) if tune else len(feats)
    trunk = None
    if tune and model.config["tuned_blocks"]:  # the frozen blocks' output, once per image
        trunk = encode(model, pixels, fn=model.trunk)
    for _ in bar:
        idx = torch.randint(n, (min(batch, n),), generator=g)
        c = cls[idx]
        r = regions[idx]
        x = {"pixel_values": pixels[idx].to(model.device)} if tune else {"features": feats[idx]}
        with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=model.device.type == "cuda"):
            if trunk is not None:
                x = {"features": model.features_from_trunk(trunk[idx])}
            out = model.losses(y[idx], c if (c >= 0).all() else None, region_masks=r if r.any() else None, **x)
        opt.zero_grad(set_to_none=True)
        out["total"].backward()
        opt.step()
        sched.step()
        hist.append({k: float(v.detach()) for k, v in out.items()})
        bar.set_postfix(loss=f"{hist[-1]['total']:.3f}")
        if on_step is not None:
            on_step(len(hist), hist[-1]["total"])
    model.eval()
    if tune:
        feats = encode(model, pixels) if trunk is None else encode(model, trunk, fn=model.features_from_trunk)
    with torch.no_grad():
        scores = model.scores_from_maps(model.similarity_maps(feats.to(model.device))).cpu()
    fired = []
    if fire is not None:
        idx, masks, share = fire
        fired = model.prototypes_firing_on(feats[list(idx)], masks, share)
        if len(set(fired) | set(int(i) for i in prune)) >= model.n_prototypes:
            raise ValueError(f"every prototype fires on the region in more than {share:.0%} of its images: "
                             "nothing would be left; raise the share or draw the region more tightly")
    prune = sorted(set(int(i) for i in prune) | set(fired))
    if prune:
        kept = model.prune_prototypes(prune)
        scores = scores[:, kept]
    labelled = cls >= 0
    refit_acc = None
    if labelled.any():  # stage 4 to convergence on the final prototype scores (after any pruning)
        refit_acc = model.refit_task_head(scores[labelled], cls[labelled])
    return hist, refit_acc, fired, feats


def train_csr(bundle, items, out_path, concepts, classes, steps: int = DEFAULTS["steps"], batch: int = DEFAULTS["batch"],
              lr: float = DEFAULTS["lr"], seed: int = 0, init=None, prune=(), progress: bool = True, log=print,
              extra: dict | None = None, prune_firing_on: str | None = None, fire_share: float = 0.5,
              region_weight: float | None = None, finetune_backbone: bool | None = None,
              backbone_lr: float = DEFAULTS["backbone_lr"], add_concepts=(), on_step=None, **cfg) -> dict:
    """Train a CSR model on `items`, build its atlas, optionally prune prototypes, publish to `out_path`.

    `prune_firing_on`: the name of drawn regions (an item's drawn dict, e.g. "text marker") on which
    prototypes must not fire: those peaking on it in more than `fire_share` of the images that have it
    are pruned (firing-map pruning). `region_weight` (None: the model's own) weights the drawn regions'
    patch supervision (`CSRModel.region_loss`), also when continuing from `init`. `finetune_backbone`:
    None keeps the model's own choice (a fresh model: frozen); True trains the model's own copy of the
    vision tower at `backbone_lr` (a frozen `init` gets one); False refuses an `init` that has one.
    `add_concepts`: (name, description or None) pairs added by text before training
    (`CSRModel.add_concept_by_text`); the items' labels and drawn regions under those names train them.
    `on_step(step, loss)`: called after each training step (`fit_csr`)."""

    t0 = time.time()
    torch.manual_seed(seed)
    if not items:
        raise ValueError("no training items")
    if prune_firing_on and not 0.0 <= float(fire_share) < 1.0:
        raise ValueError(f"fire_share must be in [0, 1), got {fire_share}")
    if not 0.0 <= float(backbone_lr) <= 1.0:
        raise ValueError(f"backbone_lr must be in [0, 1], got {backbone_lr}")
    model = (CSRModel.load(bundle, init) if init else CSRModel.from_bundle(bundle, concepts, classes, **cfg))
    if finetune_backbone:
        model.own_backbone()
    elif finetune_backbone is not None and model.config["finetune_backbone"]:
        raise ValueError(f"{init} has its own fine-tuned backbone; it cannot be trained frozen "
                         "(train a fresh model instead)")
    added = []
    for name, description in add_concepts:
        if name not in model.concepts:
            added += model.add_concept_by_text(bundle, name, description)
    if region_weight is not None:
        model.config["region_weight"] = float(region_weight)
    model.train()
    if model.config["finetune_backbone"]:  # trains on pixels; features are encoded after training
        pixels = torch.cat([pv for _, pv in pixel_batches(bundle, items, size=model.image_size)])
        feats, (y, cls, regions) = None, _targets(model, items)
    else:
        pixels = None
        feats, y, cls, regions = _tensors(bundle, model, items)
    drawn = int((regions.flatten(2).amax(-1) > 0).sum())
    log(f"CSR: {len(items)} images, {len(model.concepts)} concepts, {len(model.classes)} classes, "
        f"{drawn} drawn regions, features {time.time() - t0:.1f}s")
    fire = None
    if prune_firing_on:
        idx = [i for i, it in enumerate(items) if (it[4] or {}).get(prune_firing_on) is not None
               and np.asarray(it[4][prune_firing_on]).any()]
        if not idx:
            raise ValueError(f"no image has a drawn region named {prune_firing_on!r} to find the prototypes firing on it")
        fire = (idx, [items[i][4][prune_firing_on] for i in idx], fire_share)
        log(f"CSR: pruning prototypes that fire on {prune_firing_on!r} in more than {fire_share:.0%} of {len(idx)} images")
    hist, refit_acc, fired, feats = fit_csr(model, feats, y, cls, regions, steps, batch, lr, seed, prune, progress,
                                            fire, pixels=pixels, backbone_lr=backbone_lr, on_step=on_step)
    labelled = cls >= 0
    with torch.no_grad():
        out = model(features=feats.to(model.device))
        acc = float((out["logits"].argmax(-1).cpu()[labelled] == cls[labelled]).float().mean()) if labelled.any() else None
        auroc = _auroc(torch.sigmoid(out["concept_logits"]).cpu().numpy(), y.numpy())
    ids = [it[0] for it in items]
    model.build_atlas([(ids[i:i + 32], feats[i:i + 32], y[i:i + 32]) for i in range(0, len(ids), 32)], features=True)
    summary = {"images": len(items), "steps": steps, "batch": batch, "lr": lr, "seed": seed,
               **({"backbone_lr": backbone_lr} if pixels is not None else {}),
               "drawn_regions": drawn, "region_weight": model.config["region_weight"],
               "pruned": sorted(set(int(i) for i in prune) | set(fired)),
               **({"added_concepts": [n for n, _ in add_concepts], "added_prototypes": added} if add_concepts else {}),
               "firing_on": ({"region": prune_firing_on, "share": fire_share, "images": len(fire[0]), "pruned": fired}
                             if fire else None),
               "train_class_accuracy": acc,
               "train_concept_auroc": round(auroc, 4), "refit_accuracy": refit_acc,
               "final_loss": round(float(np.mean([h["total"] for h in hist[-20:]])), 4) if hist else None,
               "device": str(model.device), "seconds": round(time.time() - t0, 1), **(extra or {})}
    model.save(out_path, extra={"training": summary})
    log(f"published {out_path}: concept AUROC {auroc:.3f}, class accuracy {acc}, {summary['seconds']}s")
    return summary


def train_concept_models_default(out_dir, families=tuple(CSR_FAMILIES), seed: int = 0,
                                 n_images: int = DEFAULTS["n_images"], steps: int = DEFAULTS["steps"],
                                 prompt_steps: int | None = None, device=None, progress: bool = True,
                                 log=print) -> dict:
    """The shipped CSR models and ClinCoCoOp prompt learners, one of each per family, trained on the
    same phantoms on the CLIP in `out_dir` (loaded once). The CSR models also learn from the phantoms'
    concept masks as drawn regions (benchmarks/concepts.py, held-out: derm pointing after pruning 0.62 without
    them, 0.84 with them and the region loss; chest 0.10 and 0.59)."""
    from clinlens.models.clip import load_clip
    from clinlens.trainers.prompt_learning import DEFAULTS as PROMPT_DEFAULTS
    from clinlens.trainers.prompt_learning import prompt_file, train_prompt_learner

    bundle = load_clip(out_dir, device=device)
    out = {}
    for fam in families:
        concepts, classes = CSR_FAMILIES[fam]
        items = phantom_concept_items(fam, seed, n_images, drawn=True)
        extra = {"command": "clinlens train-default --concepts-only", "family": fam}
        out[fam] = train_csr(bundle, items, csr_file(out_dir, fam), concepts, classes, steps=steps, seed=seed,
                             progress=progress, log=log, extra=extra, **SHIPPED.get(fam, {}))
        out[f"{fam}_prompts"] = train_prompt_learner(
            bundle, items, prompt_file(out_dir, fam), concepts, classes, seed=seed, progress=progress, log=log,
            steps=PROMPT_DEFAULTS["steps"] if prompt_steps is None else prompt_steps, extra=extra)
    return out
