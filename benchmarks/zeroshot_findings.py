"""Zero-shot finding recognition of the default CLIP on held-out phantoms, against chance and a linear probe.

Per finding: AUROC of the negation-aware zero-shot probability (p(f) vs p(no f)), of the
positive prompt's cosine alone, and of a logistic-regression probe on the frozen image
embedding (trained on a disjoint split). Derm diagnosis: 3-way zero-shot accuracy vs chance.
Writes benchmarks/results/zeroshot_findings.md and .png.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, header  # noqa: E402

from clinlens.data.pairs import PairSet, add_phantom  # noqa: E402
from clinlens.data.phantoms import CHEST_FINDINGS, CT_FINDINGS, DERM_CONCEPTS, DERM_DIAGNOSES, make_derm  # noqa: E402
from clinlens.models.clip import load_clip  # noqa: E402
from clinlens.models.zeroshot import ZeroShotScorer  # noqa: E402
from clinlens.trainers.negation import image_embeddings  # noqa: E402

HELD_OUT = 50_000_000  # seeds far from train-default's


def held_out(counts: dict, size: int, seed: int) -> PairSet:
    rng = np.random.default_rng(seed)
    ps = PairSet()
    for fam, n in counts.items():
        for i in range(n):
            add_phantom(ps, fam, HELD_OUT + seed * 100_000 + {"chest": 0, "derm": 20_000, "ct": 40_000}[fam] + i,
                        size, rng, crops=0, ct_slices=3)
    return ps


@torch.no_grad()
def embed(bundle, images: np.ndarray) -> torch.Tensor:
    """Image embeddings on the CPU, whatever the bundle's device."""
    with torch.no_grad():
        return image_embeddings(bundle, images, bs=128, progress=False).cpu()


def main(argv=None):
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=None, help="HF CLIP dir (default: the embedded default)")
    ap.add_argument("--n-chest", type=int, default=400)
    ap.add_argument("--n-derm", type=int, default=300)
    ap.add_argument("--n-ct", type=int, default=60)
    ap.add_argument("--out", default=str(RESULTS / "zeroshot_findings"))
    a = ap.parse_args(argv)

    bundle = load_clip(a.model)
    ps = held_out({"chest": a.n_chest, "derm": a.n_derm, "ct": a.n_ct}, bundle.image_size, seed=1)
    fams = np.array(ps.family)
    emb = embed(bundle, ps.array())
    rows, plot = [], []
    for fam, findings in (("chest", CHEST_FINDINGS), ("derm", DERM_CONCEPTS), ("ct", CT_FINDINGS)):
        sel = np.flatnonzero(fams == fam)
        half = len(sel) // 2
        probe_idx, test_idx = sel[:half], sel[half:]
        scorer = ZeroShotScorer(bundle, findings)
        with torch.no_grad():
            pos, neg = (e.cpu() for e in scorer.text_embeddings())
            logits = torch.stack([emb[test_idx] @ pos.T, emb[test_idx] @ neg.T], -1)
            p = (logits * float(bundle.logit_scale)).softmax(-1)[..., 0].numpy()
            cos = (emb[test_idx] @ pos.T).numpy()
        for j, f in enumerate(findings):
            y_all = np.array([ps.labels[i].get(f, 0) for i in sel])
            y = y_all[half:]
            if y.min() == y.max() or y_all[:half].min() == y_all[:half].max():
                continue
            clf = LogisticRegression(max_iter=2000, C=1.0).fit(emb[probe_idx].numpy(), y_all[:half])
            probe = roc_auc_score(y, clf.predict_proba(emb[test_idx].numpy())[:, 1])
            zs, cs = roc_auc_score(y, p[:, j]), roc_auc_score(y, cos[:, j])
            acc = float(((p[:, j] >= 0.5) == y).mean())
            maj = float(max(y.mean(), 1 - y.mean()))
            rows.append((fam, f, int(y.sum()), len(y), zs, cs, probe, acc, maj))
            plot.append((f"{fam}: {f}", zs, probe))
    # derm diagnosis, 3-way zero-shot
    dx_imgs, dx_y = [], []
    from clinlens.data.pairs import resize_rgb

    for i in range(150):
        s = make_derm(HELD_OUT + 90_000 + i)
        dx_imgs.append(resize_rgb(s.image.astype(np.float32) / 255, bundle.image_size))
        dx_y.append(DERM_DIAGNOSES.index(s.diagnosis))
    dx_emb = embed(bundle, np.stack(dx_imgs))
    with torch.no_grad():
        t = bundle.encode_texts([f"consistent with {d}." for d in DERM_DIAGNOSES]).cpu()
    dx_acc = float(((dx_emb @ t.T).argmax(1).numpy() == np.array(dx_y)).mean())
    dx_major = float(np.bincount(dx_y).max() / len(dx_y))

    zs_mean = np.mean([r[4] for r in rows])
    probe_mean = np.mean([r[6] for r in rows])
    lines = [header("Zero-shot finding recognition (default CLIP, held-out phantoms)"),
             f"- model: `{bundle.path}`; held-out images: {len(ps)} (chest {a.n_chest}, derm {a.n_derm}, "
             f"CT {a.n_ct} volumes x 3 slices); probe trained on the first half of each family, all scores on the second half.\n",
             "| family | finding | positives | n | zero-shot AUROC (f vs no f) | positive-prompt cosine AUROC | linear probe AUROC | zero-shot acc @0.5 | majority acc |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]:.3f} | {r[5]:.3f} | {r[6]:.3f} | {r[7]:.3f} | {r[8]:.3f} |" for r in rows]
    lines += [f"| **mean** | | | | **{zs_mean:.3f}** | {np.mean([r[5] for r in rows]):.3f} | {probe_mean:.3f} | | |",
              "", f"Chance AUROC is 0.500. Derm diagnosis, 3-way zero-shot (\"consistent with {{dx}}.\"): "
              f"accuracy {dx_acc:.3f} on 150 held-out lesions (chance 0.333, majority {dx_major:.3f}).", ""]
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(lines))
    out.with_suffix(".json").write_text(json.dumps({"rows": rows, "zs_mean": zs_mean, "probe_mean": probe_mean,
                                                    "derm_dx_acc": dx_acc}, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    xs = np.arange(len(plot))
    ax.bar(xs - 0.2, [p[1] for p in plot], 0.4, label="zero-shot")
    ax.bar(xs + 0.2, [p[2] for p in plot], 0.4, label="linear probe")
    ax.axhline(0.5, color="k", ls="--", lw=1, label="chance")
    ax.set_xticks(xs, [p[0] for p in plot], rotation=60, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("AUROC")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
