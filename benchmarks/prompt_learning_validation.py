"""ClinCoCoOp configurations against CoOp on validation phantoms (never the held-out set of
benchmarks/prompt_learning.py): which of the learner's terms help at 4 and 16 shots.

Pool `phantom_concept_items(family, 5, n)`, test `phantom_concept_items(family, 6, n)` (the held-out
benchmark uses bases 1 and 9). Every configuration trains with `train_prompt_learner` (same budget,
seed, init text and frozen CLIP) from a `ClinCoCoOp` built with that configuration and the class
concepts of its few-shot labels. Accuracy on the normal and the shifted domain (t = 0.5).

Writes benchmarks/results/prompt_learning_validation.md and .json.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, header, write_results  # noqa: E402
from prompt_learning import COOP, encode, few_shot, learner_outputs, metrics, shifted  # noqa: E402

from clinlens.models.clip import load_clip  # noqa: E402
from clinlens.models.prompt_learner import ClinCoCoOp, class_concepts_from_labels  # noqa: E402
from clinlens.trainers.concepts import CSR_FAMILIES, phantom_concept_items  # noqa: E402
from clinlens.trainers.prompt_learning import DEFAULTS, train_prompt_learner  # noqa: E402

POOL_SEED, TEST_SEED = 5, 6
LOCAL_CE = dict(local_loss_weight=1.0)  # the default these runs started from
CONFIGS = {
    "ClinCoCoOp, local CE 1 (former default)": LOCAL_CE,
    "CoOp": COOP,
    "align weight 5 (XCoOp)": dict(LOCAL_CE, align_weight=5.0),
    "align weight 0.1": dict(LOCAL_CE, align_weight=0.1),
    "no meta-net": dict(LOCAL_CE, conditional=False),
    "no local CE (app default)": dict(local_loss_weight=0.0),
    "no meta-net, no local CE": dict(conditional=False, local_loss_weight=0.0),
    # the weight λ of the local term in the logits (default 0.01, XCoOp's scale): CT's class signal sits in its
    # patch tokens, not in its image embedding (benchmarks/results/feature_signal.md)
    "local weight 0.1": dict(local_loss_weight=0.0, local_weight=0.1),
    "local weight 1": dict(local_loss_weight=0.0, local_weight=1.0),
}


def run_family(bundle, fam, a, tmp, log) -> list[dict]:
    concepts, classes = CSR_FAMILIES[fam]
    pool = phantom_concept_items(fam, POOL_SEED, a.n_pool, a.size)
    test = phantom_concept_items(fam, TEST_SEED, a.n_test, a.size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m0 = ClinCoCoOp.from_bundle(bundle, list(classes), list(concepts), **COOP)
    feats = {dom: encode(m0, bundle, shifted(test, t)) for dom, t in (("normal", None), ("shifted", 0.5))}
    y = torch.tensor([classes.index(it[3]) for it in test])
    runs = []
    for k in a.shots:
        for s in range(a.seeds):
            train = few_shot(pool, classes, k, s)
            yc = torch.tensor([[float(it[2].get(c, 0)) for c in concepts] for it in train])
            ytr = torch.tensor([classes.index(it[3]) for it in train])
            cc = class_concepts_from_labels(yc, ytr, concepts, classes)
            for name, cfg in CONFIGS.items():
                if a.configs and name not in a.configs:
                    continue
                t1 = time.time()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    init = ClinCoCoOp.from_bundle(bundle, list(classes), list(concepts), class_concepts=cc, **cfg)
                    init_path = init.save(tmp / "init.safetensors")
                    path = tmp / "model.safetensors"
                    train_prompt_learner(bundle, train, path, concepts, classes, steps=a.steps, seed=s, init=init_path,
                                         progress=False, log=lambda *_: None)
                    model = ClinCoCoOp.load(bundle, path)
                r = {"family": fam, "config": name, "shots": k, "seed": s}
                for dom, (f, z) in feats.items():
                    r[dom] = metrics(learner_outputs(model, f, z)[0], y, len(classes))
                runs.append(r)
                log(f"[{fam}] {name} K={k} s={s}: normal {r['normal']['acc']:.3f} shifted {r['shifted']['acc']:.3f} "
                    f"({time.time() - t1:.1f}s)")
    return runs


def mean(runs, fam, name, k, dom):
    v = [r[dom]["acc"] for r in runs if r["family"] == fam and r["config"] == name and r["shots"] == k]
    return float(np.mean(v)) if v else float("nan")


def paired(runs, fam, name, k, dom):
    """Mean over seeds of (config − CoOp) accuracy."""
    by = {(r["config"], r["seed"]): r[dom]["acc"] for r in runs if r["family"] == fam and r["shots"] == k}
    d = [by[(name, s)] - by[("CoOp", s)] for (c, s) in by if c == name and ("CoOp", s) in by]
    return float(np.mean(d)) if d else float("nan")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--families", nargs="+", default=["derm", "chest", "ct"], choices=sorted(CSR_FAMILIES))
    ap.add_argument("--shots", type=int, nargs="+", default=[4, 16])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--n-pool", type=int, default=600)
    ap.add_argument("--n-test", type=int, default=300)
    ap.add_argument("--steps", type=int, default=DEFAULTS["steps"])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--configs", nargs="*", default=None, help="subset of configuration names")
    ap.add_argument("--out", default=str(RESULTS / "prompt_learning_validation"))
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    t0 = time.time()
    bundle = load_clip(None)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for fam in a.families:
            runs += run_family(bundle, fam, a, Path(tmp), lambda m: print(m, flush=True))
    names = [n for n in CONFIGS if any(r["config"] == n for r in runs)]
    lines = [header("ClinCoCoOp configurations against CoOp: validation phantoms"),
              f"- pool: `phantom_concept_items(family, {POOL_SEED}, {a.n_pool})`, test: `phantom_concept_items(family, "
              f"{TEST_SEED}, {a.n_test})` (held-out benchmark: bases 1 and 9); shots {a.shots}, sampling seeds "
              f"0..{a.seeds - 1}, {a.steps} steps, app defaults otherwise; accuracy mean over seeds, Δ = paired "
              "difference to CoOp (same few-shot set and seed).", ""]
    for dom in ("normal", "shifted"):
        lines += [f"## {dom} domain", "", "| configuration | " + " | ".join(
            f"{f} K={k} (Δ)" for f in a.families for k in a.shots) + " | mean Δ |",
            "|---|" + "---|" * (len(a.families) * len(a.shots) + 1)]
        for n in names:
            cells = [f"{mean(runs, f, n, k, dom):.3f} ({paired(runs, f, n, k, dom):+.3f})" for f in a.families
                     for k in a.shots]
            md = np.mean([paired(runs, f, n, k, dom) for f in a.families for k in a.shots])
            lines.append(f"| {n} | " + " | ".join(cells) + f" | {md:+.3f} |")
        lines.append("")
    lines.append(f"Run time: {time.time() - t0:.0f}s.")
    write_results(a.out, lines, {"runs": runs, "configs": CONFIGS})


if __name__ == "__main__":
    main()
