"""Training of the ClinCoCoOp prompt learner (methods.md §3) on cached frozen image features.

Items are those of the concept trainer (`clinlens.trainers.concepts`): (id, image, concepts, class,
drawn regions); only images with a class train. Each class's concepts (for α) come from the labels
(`class_concepts_from_labels`). One learner per image family (`prompt_<family>.safetensors`).
CUDA with bf16 autocast when the bundle is on a GPU.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from clinlens.models.prompt_learner import ClinCoCoOp, class_concepts_from_labels
from clinlens.trainers.concepts import pixel_batches

DEFAULTS = dict(steps=150, batch=32, lr=2e-3, n_images=240)


def prompt_file(model_dir, family: str) -> Path:
    return Path(model_dir) / f"prompt_{family}.safetensors"


def train_prompt_learner(bundle, items, out_path, concepts, classes, steps: int = DEFAULTS["steps"],
                         batch: int = DEFAULTS["batch"], lr: float = DEFAULTS["lr"], seed: int = 0, init=None,
                         progress: bool = True, log=print, extra: dict | None = None) -> dict:
    from tqdm.auto import tqdm

    t0 = time.time()
    torch.manual_seed(seed)
    items = [it for it in items if it[3] in classes]
    if not items:
        raise ValueError(f"no item has a class among {list(classes)}")
    y = torch.tensor([classes.index(it[3]) for it in items])
    yc = torch.tensor([[float(it[2].get(c, 0)) for c in concepts] for it in items])
    model = (ClinCoCoOp.load(bundle, init) if init else
             ClinCoCoOp.from_bundle(bundle, list(classes), list(concepts),
                                    class_concepts=class_concepts_from_labels(yc, y, concepts, classes)))
    with torch.no_grad():
        enc = [model.encode_image(pv) for _, pv in pixel_batches(bundle, items)]
    feats, toks = torch.cat([f.cpu() for f, _ in enc]), torch.cat([z.cpu() for _, z in enc])
    with torch.no_grad():
        zero_acc = float((model(image_features=feats, patch_tokens=toks)["logits"].argmax(-1).cpu() == y).float().mean())
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    dev = model.device
    g = torch.Generator().manual_seed(seed)
    losses = []
    model.train()
    for _ in tqdm(range(steps), desc="train-prompts", disable=not progress, mininterval=5):
        idx = torch.randint(len(items), (min(batch, len(items)),), generator=g)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            out = model(image_features=feats[idx], patch_tokens=toks[idx], labels=y[idx])
        opt.zero_grad(set_to_none=True)
        out["loss"]["total"].backward()
        opt.step()
        losses.append(float(out["loss"]["total"].detach()))
    model.eval()
    with torch.no_grad():
        acc = float((model(image_features=feats, patch_tokens=toks)["logits"].argmax(-1).cpu() == y).float().mean())
    summary = {"images": len(items), "steps": steps, "batch": batch, "lr": lr, "seed": seed,
               "train_accuracy_before": round(zero_acc, 4), "train_accuracy": round(acc, 4),
               "final_loss": round(float(np.mean(losses[-20:])), 4) if losses else None,
               "seconds": round(time.time() - t0, 1), **(extra or {})}
    model.save(out_path, extra={"training": summary})
    log(f"published {out_path}: train accuracy {zero_acc:.3f} -> {acc:.3f}, {summary['seconds']}s")
    return summary
