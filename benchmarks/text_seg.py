"""Text-prompted segmentation (`text_seg`, the task `clinlens batch` segments with) on held-out phantoms.

Every finding of the family's vocabulary is asked of every image: present findings should be found
where they are, absent ones not at all. The two scoring rules of the task are run side by side on the
same images: `negation` (the prompt against "no <prompt>", a 2-way softmax) and `vocabulary` (the
prompt against its negation and the family's other findings). Metrics per family and rule:
found rate and hit rate (the mask touches the finding) on present findings, mean Dice on present
findings (0 when not found), false-positive rate on absent findings, and the accuracy of the found /
not found decision. Writes benchmarks/results/text_seg.md and .json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import header  # noqa: E402
from interactive_seg import RESULTS, dice, held_out_seed  # noqa: E402

from clinlens.data.image_io import LoadedImage  # noqa: E402
from clinlens.data.phantoms import CHEST_FINDINGS, CT_FINDINGS, make_chest, make_ct  # noqa: E402
from clinlens.infer.region import TEXT_SEG_CONTRASTS, LazyRegion, TextSegInfer  # noqa: E402
from clinlens.models.clip import LazyClip  # noqa: E402

VOCAB = {"chest": CHEST_FINDINGS, "ct": CT_FINDINGS}


def images(family: str, n: int, ct_shape, size: int):
    """(id, LoadedImage, {finding: mask}) of held-out phantoms."""
    for i in range(n):
        s = make_ct(held_out_seed(i), shape=tuple(ct_shape)) if family == "ct" else make_chest(held_out_seed(i), size)
        ref = sitk.GetImageFromArray(np.asarray(s.image, np.float32))
        if s.spacing:
            ref.SetSpacing(tuple(float(v) for v in s.spacing)[:ref.GetDimension()])
        masks = {k: np.asarray(m, bool) for k, m in s.masks.items() if np.asarray(m).any()}
        yield f"{family}{i}", LoadedImage(array=s.image, ref=ref, path=f"{family}{i}", is_rgb=False), masks


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20, help="images per family")
    ap.add_argument("--ct-shape", type=int, nargs=3, default=(24, 96, 128), help="CT phantom z y x (the sample studies')")
    ap.add_argument("--size", type=int, default=256, help="chest image size")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS / "text_seg"))
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    clip = LazyClip(None, device="cpu")
    region = LazyRegion(clip, clip.path / "region.safetensors")
    task = TextSegInfer(region, VOCAB, {})
    t_start = time.time()
    rows = []
    for fam in VOCAB:
        for iid, img, masks in tqdm(list(images(fam, a.n, a.ct_shape, a.size)), desc=fam):
            for finding in VOCAB[fam]:
                truth = masks.get(finding)
                for contrast in TEXT_SEG_CONTRASTS:
                    t0 = time.perf_counter()
                    mask, res = task.run({"image": iid, "prompt": finding, "contrast": contrast}, img)
                    m = np.asarray(mask) > 0
                    rows.append({"family": fam, "image": iid, "finding": finding, "contrast": contrast,
                                 "present": truth is not None, "found": bool(res["found"]) and bool(m.any()),
                                 "score": res["score"], "hit": bool(truth is not None and (m & truth).any()),
                                 "dice": dice(m, truth) if truth is not None else None,
                                 "seconds": time.perf_counter() - t0})
    table = []
    for fam in VOCAB:
        for contrast in TEXT_SEG_CONTRASTS:
            r = [x for x in rows if x["family"] == fam and x["contrast"] == contrast]
            pres, absent = [x for x in r if x["present"]], [x for x in r if not x["present"]]
            table.append({"family": fam, "contrast": contrast, "present": len(pres), "absent": len(absent),
                          "found_present": np.mean([x["found"] for x in pres]),
                          "hit_present": np.mean([x["found"] and x["hit"] for x in pres]),
                          "dice_present": np.mean([x["dice"] if x["found"] else 0.0 for x in pres]),
                          "fp_absent": np.mean([x["found"] for x in absent]) if absent else float("nan"),
                          "decision_acc": np.mean([x["found"] == x["present"] for x in r]),
                          "seconds": np.mean([x["seconds"] for x in r])})
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"table": table, "rows": rows}, indent=1, default=float))
    lines = [header("Text-prompted segmentation (`text_seg`) on held-out phantoms: negation vs vocabulary contrast"),
             f"- {a.n} held-out phantoms per family (seeds {held_out_seed(0)}+), chest {a.size} px, CT {tuple(a.ct_shape)} "
             "(z, y, x); every vocabulary finding asked of every image, default threshold 0.5; the shipped default CLIP "
             "and region model.",
             "- found = the task reports found with a non-empty mask; hit = found and the mask touches the finding; "
             "Dice over the image (0 when not found); false positive = found on an image without the finding; "
             "decision accuracy = found exactly when present.", "",
             "| family | contrast | present / absent | found (present) | hit (present) | Dice (present) | "
             "false positives (absent) | decision accuracy | s per prompt |", "|---|---|---|---|---|---|---|---|---|"]
    for t in table:
        lines.append(f"| {t['family']} | {t['contrast']} | {t['present']} / {t['absent']} | {t['found_present']:.2f} | "
                     f"{t['hit_present']:.2f} | {t['dice_present']:.3f} | {t['fp_absent']:.2f} | "
                     f"{t['decision_acc']:.2f} | {t['seconds']:.2f} |")
    lines += ["", f"Run time: {time.time() - t_start:.0f} s."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
