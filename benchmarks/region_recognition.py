"""Zero-shot region recognition on held-out phantoms: region embedding vs Alpha-CLIP's crop baseline.

Objects as in interactive_seg.py (chest findings; the derm lesion, named by its diagnosis, and its
'pigment network' / 'blue-white veil'; CT findings on their largest slice). Candidates per family:
chest findings; derm diagnoses + the two concept names; CT findings. Text = mean of the region
caption templates' embeddings. clinlens: `RegionPredictor.predict` region embedding from a box prompt
(the object's box) or from the center click. Baseline (Alpha-CLIP's comparison): the plain CLIP
image embedding of a square crop round the object's box enlarged 1.5x / 2.5x (2.5x = the predictor's
own focus window), resized to the model input; plus the whole image for reference. Top-1 accuracy.
Writes benchmarks/results/region_recognition.md and .json.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import header, write_results  # noqa: E402
from interactive_seg import FAMILIES, HELD_OUT, add_common_args, load_predictor, objects_2d  # noqa: E402

from clinlens.data.pairs import REGION_TEMPLATES  # noqa: E402
from clinlens.data.phantoms import CHEST_FINDINGS, CT_FINDINGS, DERM_DIAGNOSES, mask_box  # noqa: E402
from clinlens.models.region_predictor import crop_window, focus_window  # noqa: E402
from clinlens.trainers.region_seg import _DERM_OBJECTS, center_click  # noqa: E402

CANDIDATES = {"chest": CHEST_FINDINGS, "derm": DERM_DIAGNOSES + _DERM_OBJECTS, "ct": CT_FINDINGS}


@torch.no_grad()
def text_embeddings(bundle, names) -> torch.Tensor:
    """(names, D): mean over the region caption templates, re-normalised."""
    t = torch.stack([bundle.encode_texts([tpl.format(n) for n in names]) for tpl in REGION_TEMPLATES]).mean(0)
    return F.normalize(t.float(), dim=-1)


@torch.no_grad()
def crop_embedding(bundle, img, box, expand: float | None, min_side: int) -> np.ndarray:
    """Plain CLIP embedding of the square crop round `box` enlarged `expand` x (None: the whole image)."""
    if expand is not None:
        img = crop_window(img, focus_window(img.shape[:2], box=box, expand=expand, min_side=min_side))
    return bundle.encode_images(bundle.pixel_values(img))[0].float().numpy()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap, "region_recognition")
    ap.add_argument("--n", type=int, default=150, help="objects per family")
    a = ap.parse_args(argv)
    bundle, pred = load_predictor(a)
    methods = ["clinlens region embedding (box prompt)", "clinlens region embedding (center click)",
               "plain CLIP, crop 1.5x box", f"plain CLIP, crop {pred.expand:g}x box (= focus window)",
               "plain CLIP, whole image"]
    rows = []  # (family, truth index, {method: predicted index})
    for fi, fam in enumerate(FAMILIES):
        names = CANDIDATES[fam]
        text = text_embeddings(bundle, names).numpy()
        for j, (oid, img, m, name) in enumerate(tqdm(list(objects_2d(fam, a.n, a.size)), desc=fam)):
            box = mask_box(m)
            click = center_click(m, np.random.default_rng([HELD_OUT, fi, j]))
            embs = [pred.predict(img, oid, box=box)["region_embedding"],
                    pred.predict(img, oid, fg_xy=[click])["region_embedding"],
                    crop_embedding(bundle, img, box, 1.5, pred.min_side),
                    crop_embedding(bundle, img, box, pred.expand, pred.min_side),
                    crop_embedding(bundle, img, box, None, pred.min_side)]
            rows.append((fam, names.index(name), {k: int(np.argmax(text @ e)) for k, e in zip(methods, embs)}))

    def acc(sel, meth):
        return float(np.mean([r[2][meth] == r[1] for r in sel]))

    groups = {fam: [r for r in rows if r[0] == fam] for fam in FAMILIES}
    groups["all"] = rows
    chance = {g: float(np.mean([1 / len(CANDIDATES[r[0]]) for r in sel])) for g, sel in groups.items()}
    major = {g: float(np.mean([max(np.bincount([q[1] for q in groups[r[0]]])) / len(groups[r[0]]) for r in sel]))
             for g, sel in groups.items()}
    table = {g: {m: acc(sel, m) for m in methods} for g, sel in groups.items()}

    lines = [header("Zero-shot region recognition on held-out phantoms (region embedding vs crop baseline)"),
             f"- model: `{bundle.path}`, region model `{pred.model_path}`; held-out phantom seeds as in "
             f"`interactive_seg.py` (>= 70,900,210); chest/derm {a.size} px, CT 48x128x128 (largest slice of each finding).",
             "- candidates: chest " + ", ".join(CANDIDATES["chest"]) + "; derm " + ", ".join(CANDIDATES["derm"]) +
             " (the lesion is named by its diagnosis); CT " + ", ".join(CANDIDATES["ct"]) + ".",
             f"- text: mean embedding over the templates {', '.join(repr(t) for t in REGION_TEMPLATES)}; top-1 by "
             "cosine. Crops: square window round the object's box enlarged 1.5x / "
             f"{pred.expand:g}x (at least {pred.min_side} px, shifted inside the image), resized to "
             f"{bundle.image_size} px.",
             "- chance = 1 / number of candidates; majority = always the family's most frequent true name.",
             "- zero-shot here means no classifier head: the names are the captions the region model was trained "
             "on (region-text InfoNCE on training phantoms, disjoint seeds), and the CLIP saw report sentences "
             "naming them; the objects are held out.", "",
             "| family | objects | " + " | ".join(methods) + " | chance | majority |",
             "|---|---|" + "---|" * (len(methods) + 2)]
    for g, sel in groups.items():
        b = "**" if g == "all" else ""
        lines.append(f"| {b}{g}{b} | {len(sel)} | " + " | ".join(f"{table[g][m]:.3f}" for m in methods) +
                     f" | {chance[g]:.3f} | {major[g]:.3f} |")
    lines.append("")
    write_results(a.out, lines, {"accuracy": table, "chance": chance, "majority": major,
                                 "n": {g: len(s) for g, s in groups.items()}})


if __name__ == "__main__":
    main()
