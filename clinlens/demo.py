"""`clinlens demo`: replay one scripted clinician session over HTTP and write a short report.

The session: connect (GET /info/), ask "what is in this image" for a chest X-ray, a dermoscopy
image and a CT slice, then save a corrected label as Slicer's Save Label does. Each answer is
drawn over the image with the ground-truth boxes, and `report.md` sums it up.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import requests

from clinlens.data.image_io import load_image, to_unit_rgb
from clinlens.server import Server, read_multipart


def _overlay(path: Path, image01: np.ndarray, boxes: dict, title: str, lines: list[str], mask=None, click=None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    fig, ax = plt.subplots(figsize=(5, 5.6), dpi=100)
    ax.imshow(image01, cmap="gray")
    if mask is not None and mask.any():
        ax.contour(mask, levels=[0.5], colors="red", linewidths=1.2)
    if click is not None:
        ax.plot(*click, "r+", ms=10, mew=2)
    for name, b in boxes.items():
        if len(b) == 4:
            ax.add_patch(Rectangle((b[0], b[1]), b[2] - b[0], b[3] - b[1], fill=False, ec="lime", lw=1.2))
            ax.text(b[0], b[1] - 3, name, color="lime", fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("\n".join(lines), fontsize=8, loc="left")
    ax.set_xticks([]), ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run_demo(src_studies: str | Path, out_dir: str | Path, conf: dict | None = None) -> Path:
    import shutil

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    studies = out / "studies"  # a copy: the demo's saved label must not touch the user's studies
    if studies.exists():
        shutil.rmtree(studies)
    shutil.copytree(Path(src_studies), studies)
    index = json.loads((studies / "clinlens" / "index.json").read_text())
    picks = {}
    for rec in index["images"]:
        picks.setdefault(rec["family"], rec)
    rows = []
    with Server(studies, conf=conf, log_path=out / "server.log") as srv:
        info = requests.get(srv.url + "/info/").json()
        rows.append(f"Connected to **{info['name']}** {info['version']}: models {sorted(info['models'])}, "
                    f"{info['datastore']['total']} images ({info['datastore']['completed']} labelled).\n")
        for fam, rec in picks.items():
            truth = json.loads((studies / "clinlens" / f"{rec['id']}.json").read_text())
            img = load_image(studies / rec["image"])
            params = {}
            boxes = truth["boxes"]
            if img.array.ndim == 3 and not img.is_rgb:
                zs = [b[2] for b in boxes.values() if len(b) == 6]
                k = int(np.mean([(b[2] + b[5]) / 2 for b in boxes.values()])) if zs else img.array.shape[0] // 2
                params["slice"] = k
                plane = img.array[k]
                boxes = {n: [b[0], b[1], b[3], b[4]] for n, b in boxes.items() if b[2] <= k < b[5]}
            else:
                plane = img.array
            t = time.perf_counter()
            r = requests.post(f"{srv.url}/infer/zeroshot", params={"image": rec["id"], "output": "json"},
                              files={"params": (None, json.dumps(params))})
            ms = 1000 * (time.perf_counter() - t)
            r.raise_for_status()
            res = r.json()
            present = [k for k, v in truth["concepts"].items() if v]
            top = [f"{f['finding']} {f['probability']:.2f}" for f in res["findings"][:4]]
            # the clinician clicks the centre of the first finding: region_seg answers mask + what is here
            mask, click, seg_line = None, None, "no finding box on this slice to click"
            if boxes:
                name, b = next(iter(boxes.items()))
                click = ((b[0] + b[2]) // 2, (b[1] + b[3]) // 2)
                p = {"foreground": [[click[0], click[1], params.get("slice", 0)]], "label": name, **params}
                t = time.perf_counter()
                r = requests.post(f"{srv.url}/infer/region_seg", params={"image": rec["id"]},
                                  files={"params": (None, json.dumps(p))})
                ms_seg = 1000 * (time.perf_counter() - t)
                if r.ok:
                    parts = read_multipart(r)
                    what = json.loads(parts["params"].content)["what_is_here"]
                    lab = out / f"{rec['id']}_region{Path(rec['image']).suffixes[-1] if fam != 'ct' else '.nii.gz'}"
                    lab.write_bytes(parts["image"].content)
                    m = load_image(lab).array
                    mask = m[params["slice"]] if m.ndim == 3 else m
                    seg_line = (f"click on {name}: what is here = " +
                                ", ".join(f"{w['finding']} {w['score']:.2f}" for w in what) + f" ({ms_seg:.0f} ms)")
            png = out / f"{rec['id']}.png"
            _overlay(png, to_unit_rgb(plane), boxes, f"{rec['id']} — truth: {', '.join(present) or 'normal'}",
                     ["zero-shot top: " + "; ".join(top), seg_line], mask, click)
            rows.append(f"## {rec['id']} ({fam})\n\nReport: _{truth['report']}_\n\n"
                        f"Zero-shot top findings: {', '.join(top)} (HTTP round trip {ms:.0f} ms)\n\n"
                        f"Region click: {seg_line}\n\n![]({png.name})\n")
        # the clinician corrects a label and saves it (Slicer's Save Label)
        rec = next((r for r in index["images"] if r["family"] == "chest" and not r["label"]), picks["chest"])
        lab = np.zeros(load_image(studies / rec["image"]).spatial_shape, np.uint8)
        h, w = lab.shape
        lab[h // 3: h // 2, w // 5: w // 3] = 3
        import SimpleITK as sitk

        lp = out / "correction.png"
        sitk.WriteImage(sitk.GetImageFromArray(lab), str(lp))
        r = requests.put(f"{srv.url}/datastore/label", params={"image": rec["id"], "tag": "final"},
                         files={"label": (lp.name, lp.read_bytes()),
                                "params": (None, json.dumps({"label_info": [{"name": "consolidation", "idx": 3}]}))})
        rows.append(f"Saved a corrected label for {rec['id']}: HTTP {r.status_code}.\n")
    report = out / "report.md"
    report.write_text("# clinlens demo session\n\n" + "\n".join(rows))
    return report
