"""Choosing CSR's region loss and backbone fine-tuning on validation phantoms (never the held-out set of
benchmarks/concepts.py).

CSR is trained as `clinlens train-default --concepts-only` trains the shipped models (240 seed-0 phantoms
with their concept masks as drawn regions, training seed 0 unless `--seed`, default steps), once per
setting of the drawn-region loss (`region_weight`, `region_mode`), of the input size, or of the backbone
(`finetune_backbone` at `backbone_lr`: the whole tower, or only its last `tuned_blocks`; with the shipped
region loss; `--device cuda` for the costly ones); pointing (mask and box, as benchmarks/concepts.py) and
macro-F1 before and after atlas pruning on validation phantoms of seed bases 5 and 6 (held-out: base 9).
Writes benchmarks/results/concepts_region_loss.md and .json.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, header, write_results  # noqa: E402
from concepts import evaluate  # noqa: E402

from clinlens.models.clip import load_clip  # noqa: E402
from clinlens.models.csr import CSRModel  # noqa: E402
from clinlens.trainers.concepts import CSR_FAMILIES, _tensors, phantom_concept_items, train_csr  # noqa: E402

SETTINGS = {"none (weight 0)": dict(region_weight=0.0)}
for mode in ("prototype", "concept"):
    for w in (0.3, 1.0, 3.0):
        SETTINGS[f"{mode}, weight {w:g}"] = dict(region_weight=w, region_mode=mode)
for blr in (3e-5, 1e-4, 3e-4, 1e-3):
    SETTINGS[f"fine-tuned backbone, lr {blr:.0e}"] = dict(finetune_backbone=True, backbone_lr=blr)
for size in (448, 672):
    SETTINGS[f"input {size} px ({size // 16}x{size // 16} patches)"] = dict(input_size=size)
for size in (448, 672):
    SETTINGS[f"fine-tuned backbone, lr 3e-04, input {size} px"] = dict(finetune_backbone=True, backbone_lr=3e-4,
                                                                      input_size=size)
for size in (224, 448, 672):  # only the last k blocks of the tower train: the rest is cached once
    for k in (1, 2):
        SETTINGS[f"fine-tuned last {k} block{'s' * (k > 1)}, lr 3e-04, input {size} px"] = dict(
            finetune_backbone=True, backbone_lr=3e-4, tuned_blocks=k, input_size=size)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n-train", type=int, default=240)
    ap.add_argument("--n-val", type=int, default=150)
    ap.add_argument("--bases", type=int, nargs="+", default=[5, 6])
    ap.add_argument("--families", nargs="+", default=["derm", "chest"])
    ap.add_argument("--settings", nargs="*", default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0, help="training seed (the shipped models: 0)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda (bf16 autocast in training) or cuda:N")
    ap.add_argument("--out", default=str(RESULTS / "concepts_region_loss"))
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    t0 = time.time()
    bundle = load_clip(None, device=a.device)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for fam in a.families:
            concepts, classes = CSR_FAMILIES[fam]
            train = phantom_concept_items(fam, 0, a.n_train, drawn=True)
            val = {b: phantom_concept_items(fam, b, a.n_val) for b in a.bases}
            frozen = {}  # the frozen CLIP's features per input size serve every setting that keeps it frozen
            for name, cfg in SETTINGS.items():
                if a.settings and name not in a.settings:
                    continue
                path = Path(tmp) / f"{fam}.safetensors"
                t1 = time.time()
                train_csr(bundle, train, path, concepts, classes, seed=a.seed, progress=False, log=lambda *_: None,
                          **cfg)
                seconds = time.time() - t1
                m = CSRModel.load(bundle, path)
                tuned = m.config["finetune_backbone"]
                cache = None if tuned else frozen.get(m.image_size)
                if cache is None:  # features of this model's backbone at its input
                    cache = {"train": _tensors(bundle, m, train), **{b: _tensors(bundle, m, v) for b, v in val.items()}}
                    if not tuned:
                        frozen[m.image_size] = cache
                ftr, _, ytr, _ = cache["train"]
                for b, v in val.items():
                    fte, _, yte, _ = cache[b]
                    r = evaluate(CSRModel.load(bundle, path), ftr, ytr, fte, yte, v, 224)
                    r = {k: x for k, x in r.items() if not k.startswith("per_concept")}
                    rows.append({"family": fam, "setting": name, "base": b, "seed": a.seed, "train_seconds": seconds,
                                 **r})
                    print(fam, name, b, {k: round(x, 3) if isinstance(x, float) else x for k, x in r.items()}, flush=True)
    lines = [header("CSR region loss, backbone and input size: validation phantoms"),
             f"- CSR trained as `clinlens train-default --concepts-only` ({a.n_train} seed-0 phantoms with concept masks "
             f"drawn, training seed {a.seed}), per setting; evaluated on {a.n_val} validation phantoms per seed base "
             f"{a.bases} (held-out "
             "benchmark: base 9). Pointing as in benchmarks/concepts.py (mask: the peak patch touches the mask; box: "
             "its centre inside the mask's bounding box, the paper's definition). Means over the bases.", "",
             "| family | setting | macro-F1 | F1 after pruning | pointing before, mask / box | pointing after, mask / box | pruned | train s |",
             "|---|---|---|---|---|---|---|---|"]
    for fam in a.families:
        for name in SETTINGS:
            rs = [r for r in rows if r["family"] == fam and r["setting"] == name]
            if not rs:
                continue
            m = lambda k: float(np.mean([r[k] for r in rs]))  # noqa: E731
            lines.append(f"| {fam} | {name} | {m('csr_f1'):.3f} | {m('csr_f1_pruned'):.3f} | {m('pointing_before'):.3f} / "
                         f"{m('pointing_box_before'):.3f} | {m('pointing_after'):.3f} / {m('pointing_box_after'):.3f} | "
                         f"{m('pruned'):.1f} | {m('train_seconds'):.0f} |")
    lines += ["", f"Run time: {time.time() - t0:.0f}s.", ""]
    write_results(a.out, lines, rows)


if __name__ == "__main__":
    main()
