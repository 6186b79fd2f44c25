"""Build a MONAI Label local-datastore "studies" folder from phantoms.

Layout written by :func:`make_studies` (MONAI Label's LocalDatastore lists only files at the
root that match its image extensions, so the two sub-folders are never taken for images)::

    out_dir/
      chest_000.png ...        8-bit grayscale chest radiographs (ids are the file stems)
      derm_000.png ...         RGB dermoscopy images
      ct_000.nii.gz ...        CT volumes, int16 HU, LPS geometry from the phantom spacing
      labels/final/<same name> one uint8 multi-label map per labelled image (LABELS indices)
      clinlens/<id>.json       ground truth per image; clinlens/index.json summarises the run
      dicom/<id>/slice_*.dcm   each CT also as a DICOM CT series (when dicom=True)
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from clinlens.data import phantoms
from clinlens.data.dicom_io import derived_uid, write_ct_series

# One global label index per finding/concept name, shared across families ("pleural effusion"
# is the same label in chest X-ray and CT). Lower index = more specific structure. The label map
# is painted in DECREASING index order, so where masks overlap the LOWER index wins (a nodule
# stays visible inside consolidation; derm concepts sit on top of "lesion", so the "lesion" label
# is the lesion minus its concept regions; the full masks come back from the seed).
LABELS: dict[str, int] = {
    "nodule": 1, "mass": 2, "consolidation": 3, "pleural effusion": 4, "pneumothorax": 5, "cardiomegaly": 6,
    "dots and globules": 7, "streaks": 8, "blue-white veil": 9, "pigment network": 10, "irregular border": 11,
    "lesion": 12,
    "lung nodule": 13, "lung mass": 14,
}
FAMILY_LABELS = {
    "chest": {k: LABELS[k] for k in phantoms.CHEST_FINDINGS},
    "derm": {k: LABELS[k] for k in ["lesion", *phantoms.DERM_SPATIAL]},
    "ct": {k: LABELS[k] for k in phantoms.CT_FINDINGS},
}
_EXT = {"chest": ".png", "derm": ".png", "ct": ".nii.gz"}
_VERSION = 1


def labelmap(sample: phantoms.Sample) -> np.ndarray:
    """uint8 multi-label map of a sample's masks (lower LABELS index wins on overlap)."""
    shape = sample.image.shape[:2] if sample.family == "derm" else sample.image.shape
    out = np.zeros(shape, np.uint8)
    for name in sorted(sample.masks, key=lambda k: -LABELS[k]):
        out[sample.masks[name]] = LABELS[name]
    return out


def ct_geometry(sample: phantoms.Sample) -> dict:
    """Geometry shared by the NIfTI and DICOM copies of a CT phantom: centred, identity direction."""
    Z, Y, X = sample.image.shape
    sx, sy, sz = sample.spacing
    return {"spacing": tuple(sample.spacing), "origin": (-(X - 1) * sx / 2, -(Y - 1) * sy / 2, -(Z - 1) * sz / 2),
            "direction": (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)}


def _write_image(arr: np.ndarray, path: Path, geom: dict | None = None, rgb: bool = False):
    img = sitk.GetImageFromArray(arr, isVector=rgb)
    if geom:
        img.SetSpacing(geom["spacing"])
        img.SetOrigin(geom["origin"])
        img.SetDirection(geom["direction"])
    tmp = path.with_name(".tmp_" + path.name)
    sitk.WriteImage(img, str(tmp), useCompression=path.name.endswith(".gz"))
    os.replace(tmp, path)


def _seeds(seed: int, fam: str, n: int) -> list[int]:
    ss = np.random.SeedSequence([int(seed), phantoms.FAMILIES.index(fam)])
    return [int(s) for s in ss.generate_state(n, dtype=np.uint32) % (2 ** 31)]


def make_studies(out_dir, n_chest: int = 8, n_derm: int = 6, n_ct: int = 3, labelled_fraction: float = 0.5,
                 seed: int = 0, chest_size: int = 512, derm_size: int = 256, ct_shape=(48, 128, 128),
                 dicom: bool = True, progress: bool = True, shortcut_corr: float = 0.0) -> dict:
    """Write (or reuse) a MONAI Label studies folder of phantoms; returns the index dict.

    The first ``labelled_fraction * n`` (rounded half up) images of each family get ``labels/final``. A
    second call with the same arguments on a complete folder returns the stored index without
    writing anything. Changed arguments rebuild the folder (files of the old index that are no
    longer produced are removed).
    """
    out = Path(out_dir)
    meta_dir, lab_dir = out / "clinlens", out / "labels" / "final"
    args = {"n_chest": n_chest, "n_derm": n_derm, "n_ct": n_ct, "labelled_fraction": labelled_fraction,
            "seed": seed, "chest_size": chest_size, "derm_size": derm_size, "ct_shape": list(ct_shape),
            "dicom": dicom, "shortcut_corr": shortcut_corr, "version": _VERSION}
    index_path = meta_dir / "index.json"
    old = None
    if index_path.exists():
        try:
            old = json.loads(index_path.read_text())
        except ValueError:
            old = None
    if old and old.get("args") == args and all((out / f).exists() for f in old.get("files", [])):
        return old

    for d in (out, meta_dir, lab_dir):
        d.mkdir(parents=True, exist_ok=True)
    plan = [(fam, i, s) for fam, n in (("chest", n_chest), ("derm", n_derm), ("ct", n_ct))
            for i, s in enumerate(_seeds(seed, fam, n))]
    n_lab = {f: int(np.floor(labelled_fraction * n + 0.5)) for f, n in (("chest", n_chest), ("derm", n_derm),
                                                                         ("ct", n_ct))}
    kw = {"chest": {"size": chest_size, "shortcut_corr": shortcut_corr}, "derm": {"size": derm_size},
          "ct": {"shape": tuple(ct_shape)}}
    images, files, dicom_dirs = [], [], []
    it = plan
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(plan, desc=f"phantom studies -> {out}", unit="img")
    for fam, i, s in it:
        sid = f"{fam}_{i:03d}"
        name = sid + _EXT[fam]
        smp = phantoms.make_sample(fam, s, **kw[fam])
        geom = ct_geometry(smp) if fam == "ct" else None
        if fam == "chest":
            arr = np.round(smp.image * 255).astype(np.uint8)
        else:
            arr = smp.image
        _write_image(arr, out / name, geom, rgb=fam == "derm")
        files.append(name)
        labelled = i < n_lab[fam]
        lm = labelmap(smp)
        if labelled:
            _write_image(lm, lab_dir / name, geom)
            files.append(f"labels/final/{name}")
        rec = {
            "id": sid, "family": fam, "image": name, "label": f"labels/final/{name}" if labelled else None,
            "seed": s, "shape": list(smp.image.shape), "spacing": list(smp.spacing), "diagnosis": smp.diagnosis,
            "report": smp.report, "concepts": smp.concepts, "boxes": smp.boxes,
            "labels": {k: LABELS[k] for k in sorted(smp.masks, key=LABELS.get)},
            "label_pixels": {k: int((lm == LABELS[k]).sum()) for k in sorted(smp.masks, key=LABELS.get)},
            "shortcut": bool(smp.meta.get("shortcut", False)),
        }
        if "shortcut_box" in smp.meta:
            rec["shortcut_box"] = smp.meta["shortcut_box"]
        if fam == "ct":
            rec["geometry"] = {k: list(v) for k, v in geom.items()}
            if dicom:
                study_uid = derived_uid(f"clinlens-{seed}-{sid}-{s}", "study")
                series_uid = derived_uid(f"clinlens-{seed}-{sid}-{s}", "series")
                ddir = out / "dicom" / sid
                if ddir.exists():
                    shutil.rmtree(ddir)
                paths = write_ct_series(smp, ddir, origin=geom["origin"], patient_id=f"CLINLENS{s % 10 ** 8:08d}",
                                        study_uid=study_uid, series_uid=series_uid,
                                        series_description=f"clinlens phantom {sid}")
                rec["dicom"] = {"folder": f"dicom/{sid}", "study_uid": study_uid, "series_uid": series_uid,
                                "n_files": len(paths)}
                files.append(f"dicom/{sid}/{paths[-1].name}")
                dicom_dirs.append(f"dicom/{sid}")
        (meta_dir / f"{sid}.json").write_text(json.dumps(rec, indent=1))
        files.append(f"clinlens/{sid}.json")
        images.append({k: rec[k] for k in ("id", "family", "image", "label", "diagnosis", "seed")})

    index = {"args": args, "labels": LABELS, "family_labels": FAMILY_LABELS, "images": images, "files": files,
             "dicom_dirs": dicom_dirs,
             "paint_order": "decreasing label index (lower index wins on overlap)"}
    if old:   # remove what the previous run wrote and this one did not
        keep = set(files)
        for f in old.get("files", []):
            if f not in keep and (out / f).is_file():
                (out / f).unlink()
        for d in set(old.get("dicom_dirs", [])) - set(dicom_dirs):
            if (out / d).is_dir():
                shutil.rmtree(out / d)
    tmp = meta_dir / ".index.json.tmp"
    tmp.write_text(json.dumps(index, indent=1))
    os.replace(tmp, index_path)
    return index
