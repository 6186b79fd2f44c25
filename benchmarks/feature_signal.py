"""How much class signal the frozen CLIP image features hold, per family, input size and pooling: the
ceiling every prompt learner on those features works under (benchmarks/prompt_learning.py), against
what CSR reads out through its concepts.

- Held-out phantoms `phantom_concept_items(family, 9, n)` (the test set of prompt_learning.py and concepts.py).
- Features of the embedded CLIP, frozen, at input S in {224, 448, 672} px (above 224 the position embeddings
  are interpolated, as CSR does): the image embedding (projected pooled output, what ClinCoCoOp and CoOp
  classify), and the mean and the max over the projected post-LN patch tokens.
- Each is scored by the oracle probe of prompt_learning.py: logistic regression, 5-fold cross-validated on
  the test images themselves (an upper reference no method here gets to fit).
- CSR rows (families with a shipped `csr_<family>.safetensors`, at its own input): the same probe on its
  prototype scores, and its own class prediction.

Writes benchmarks/results/feature_signal.md and .json.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, header, write_results  # noqa: E402
from prompt_learning import TEST_SEED, metrics, oracle_probe  # noqa: E402

from clinlens.models.clip import load_clip  # noqa: E402
from clinlens.models.csr import CSRModel  # noqa: E402
from clinlens.trainers.concepts import CSR_FAMILIES, csr_file, phantom_concept_items, pixel_batches  # noqa: E402

POOLS = ("image embedding", "patch tokens, mean", "patch tokens, max")


def pooled_features(bundle, items, size: int) -> dict[str, torch.Tensor]:
    """The three poolings of the frozen CLIP's features of `items` at input `size`."""
    vm, proj = bundle.model.vision_model, bundle.model.visual_projection
    out = {k: [] for k in POOLS}
    with torch.no_grad():
        for _, pv in pixel_batches(bundle, items, chunk=16, size=size):
            o = vm(pixel_values=pv, interpolate_pos_encoding=size != vm.config.image_size)
            z = proj(vm.post_layernorm(o.last_hidden_state[:, 1:]))
            out[POOLS[0]].append(F.normalize(proj(o.pooler_output), dim=-1).cpu())
            out[POOLS[1]].append(z.mean(1).cpu())
            out[POOLS[2]].append(z.amax(1).cpu())
    return {k: torch.cat(v) for k, v in out.items()}


def csr_rows(bundle, fam: str, items, y, n_classes: int) -> dict:
    path = csr_file(bundle.path, fam)
    if not path.is_file():
        return {}
    model = CSRModel.load(bundle, path)
    size = model.image_size
    scores, preds = [], []
    with torch.no_grad():
        for _, pv in pixel_batches(bundle, items, chunk=16, size=size):
            out = model(pixel_values=pv)
            scores.append(out["proto_scores"].cpu())
            preds.append(out["logits"].argmax(-1).cpu())
    return {"size": size,
            "probe on CSR prototype scores": oracle_probe(torch.cat(scores), y, n_classes),
            "CSR's own prediction": metrics(torch.cat(preds), y, n_classes)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", nargs="+", default=["derm", "chest", "ct"], choices=sorted(CSR_FAMILIES))
    ap.add_argument("--sizes", type=int, nargs="+", default=[224, 448, 672])
    ap.add_argument("--n-test", type=int, default=300)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS / "feature_signal"))
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    t0 = time.time()
    bundle = load_clip(None, device="cpu")
    rows = {}
    for fam in a.families:
        classes = CSR_FAMILIES[fam][1]
        items = phantom_concept_items(fam, TEST_SEED, a.n_test)
        y = torch.tensor([classes.index(it[3]) for it in items])
        counts = np.bincount(y.numpy(), minlength=len(classes))
        r = {"classes": classes, "n": len(items), "majority": metrics(torch.full_like(y, int(counts.argmax())), y, len(classes)),
             "sizes": {}, "encode_seconds": {}}
        for s in a.sizes:
            t1 = time.time()
            feats = pooled_features(bundle, items, s)
            r["sizes"][s] = {k: oracle_probe(v, y, len(classes)) for k, v in feats.items()}
            r["encode_seconds"][s] = round(time.time() - t1, 1)
            print(f"[{fam}] {s} px: " + ", ".join(f"{k} {v['bal_acc']:.3f}" for k, v in r["sizes"][s].items()),
                  flush=True)
        r["csr"] = csr_rows(bundle, fam, items, y, len(classes))
        rows[fam] = r

    L = [header("Class signal in the frozen CLIP features, by input size and pooling"), "",
         f"- model: `{bundle.path}` (embedded CLIP, frozen); held-out phantoms `phantom_concept_items(family, "
         f"{TEST_SEED}, {a.n_test})` (the test set of prompt_learning.py and concepts.py); CT: the axial slice through "
         "the most finding voxels.",
         "- features at input S px (position embeddings interpolated above 224): *image embedding* = the projected "
         "pooled output (what ClinCoCoOp and CoOp classify), *patch tokens, mean / max* = over the projected "
         "post-LN patch tokens.",
         "- each scored by logistic regression 5-fold cross-validated on these images themselves (prompt_learning.py's "
         "oracle probe): an upper reference, not a method. acc; bal = balanced accuracy (mean per-class recall).",
         "- CSR: the shipped `csr_<family>.safetensors` at its own input: the same probe on its prototype scores, "
         "and its own prediction (trained on 240 seed-0 phantoms with their concept regions drawn).",
         f"- total time {(time.time() - t0) / 60:.1f} min, {a.threads} torch thread(s).", ""]
    for fam, r in rows.items():
        mj = r["majority"]
        L += [f"## {fam} ({len(r['classes'])} classes; majority class {mj['acc']:.3f}, bal {mj['bal_acc']:.3f})", "",
              "| features | " + " | ".join(f"{s} px acc; bal" for s in a.sizes) + " |",
              "|---|" + "---|" * len(a.sizes)]
        for k in POOLS:
            L.append(f"| {k} | " + " | ".join(f"{r['sizes'][s][k]['acc']:.3f}; {r['sizes'][s][k]['bal_acc']:.3f}"
                                              for s in a.sizes) + " |")
        if r["csr"]:
            c = r["csr"]
            for k in ("probe on CSR prototype scores", "CSR's own prediction"):
                L.append(f"| {k} ({c['size']} px) | {c[k]['acc']:.3f}; {c[k]['bal_acc']:.3f} |" + " |" * (len(a.sizes) - 1))
        L.append("")
    def best(r, sizes):
        return max(v["bal_acc"] for s in sizes for v in r["sizes"][s].values())

    base, larger = a.sizes[0], a.sizes[1:]
    L += ["## Reading", "",
          f"- Best balanced accuracy of a probe on pooled frozen features at {base} px vs at "
          + "/".join(map(str, larger)) + " px: "
          + "; ".join(f"{f} {best(r, [base]):.3f} vs {best(r, larger):.3f} (majority {r['majority']['bal_acc']:.3f})"
                      for f, r in rows.items()) + "." if larger else "",
          "- The probe is a reference, not a strict ceiling: fitted unweighted, it leans to the majority class on "
          "imbalanced sets, and a prompt learner starts from the text prior. Where it sits near the majority "
          "class at every size, a larger input gives a prompt learner (which reads these poolings: the image "
          "embedding, and ClinCoCoOp's term over the patch tokens) nothing more to learn from.", ""]
    write_results(a.out, L, {"config": vars(a), "families": rows})


if __name__ == "__main__":
    main()
