"""DICOM series I/O with pydicom: write phantom CT series, find and read image series.

Geometry follows DICOM/ITK (LPS patient frame), arrays follow the project convention
(``[z, y, x]``), and geometry tuples are in (x, y, z) order, exactly what SimpleITK's
``SetSpacing`` / ``SetOrigin`` / ``SetDirection`` take for that array.
"""
from __future__ import annotations

import datetime
import os
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, generate_uid

# SOP classes / modalities that carry PixelData but are not images to reconstruct a volume from.
_NON_IMAGE_SOP = {
    "1.2.840.10008.5.1.4.1.1.66.4",   # Segmentation Storage
    "1.2.840.10008.5.1.4.1.1.66",     # Raw Data
    "1.2.840.10008.5.1.4.1.1.104.1",  # Encapsulated PDF
}
_NON_IMAGE_MODALITY = {"SEG", "SR", "PR", "KO", "RTSTRUCT", "RTPLAN", "REG", "DOC"}


def derived_uid(seed: str | None, *parts) -> str:
    """Deterministic UID from seed + parts, or a random one when seed is None."""
    return generate_uid() if seed is None else generate_uid(entropy_srcs=[seed, *map(str, parts)])


def write_ct_series(sample_or_volume, out_dir, spacing=None, origin=None, patient_id: str = "CLINLENS0001",
                    patient_name: str | None = None, study_uid: str | None = None, series_uid: str | None = None,
                    series_description: str = "clinlens phantom CT", study_description: str = "clinlens phantom study",
                    series_number: int = 1, study_date: str = "20240101", implicit_vr: bool = False) -> list[Path]:
    """Write a ``[z, y, x]`` HU volume (or a phantom ``Sample``) as a CT Image Storage series.

    One file per slice, ``slice_0000.dcm`` ... ; slice index 0 is the first (lowest z) slice,
    ``ImagePositionPatient`` increases by ``spacing[2]`` along z, orientation is axial
    ``[1,0,0,0,1,0]``. ``spacing`` is (x, y, z) mm (defaults to the sample's); ``origin`` is the
    (x, y, z) position of voxel [0, 0, 0] (default: volume centred on the isocentre). Pixels are
    stored as uint16 with RescaleIntercept -1024 (int16 with intercept 0 if the range needs it).
    UIDs are derived from ``series_uid``/``study_uid`` when given, so rewriting is reproducible.
    """
    vol = getattr(sample_or_volume, "image", sample_or_volume)
    if spacing is None:
        spacing = getattr(sample_or_volume, "spacing", None)
    vol = np.asarray(vol)
    if vol.ndim != 3 or spacing is None or len(spacing) != 3:
        raise ValueError("write_ct_series needs a 3D [z, y, x] volume and spacing (x, y, z)")
    vol = np.round(vol).astype(np.int32)
    Z, Y, X = vol.shape
    sx, sy, sz = (float(s) for s in spacing)
    if origin is None:
        origin = (-(X - 1) * sx / 2, -(Y - 1) * sy / 2, -(Z - 1) * sz / 2)
    lo, hi = int(vol.min()), int(vol.max())
    if lo >= -1024 and hi + 1024 <= 65535:
        intercept, stored, pr = -1024, (vol + 1024).astype(np.uint16), 0
    elif lo >= -32768 and hi <= 32767:
        intercept, stored, pr = 0, vol.astype(np.int16), 1
    else:
        raise ValueError(f"HU range [{lo}, {hi}] does not fit 16-bit storage")
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    for_uid = derived_uid(study_uid, "frame-of-reference")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now().strftime("%H%M%S")
    paths = []
    for k in range(Z):
        sop_uid = derived_uid(series_uid, "sop", k)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian if implicit_vr else ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds = Dataset()
        ds.file_meta = meta
        ds.is_little_endian, ds.is_implicit_VR = True, implicit_vr
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop_uid
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, for_uid
        ds.Modality, ds.Manufacturer, ds.BodyPartExamined = "CT", "clinlens", "CHEST"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.PatientID, ds.PatientName = patient_id, patient_name or f"Phantom^{patient_id}"
        ds.PatientBirthDate, ds.PatientSex, ds.PatientPosition = "", "O", "HFS"
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = study_date
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = now
        ds.AccessionNumber, ds.ReferringPhysicianName, ds.StudyID = "", "", "1"
        ds.StudyDescription, ds.SeriesDescription = study_description, series_description
        ds.SeriesNumber, ds.InstanceNumber, ds.AcquisitionNumber = int(series_number), k + 1, 1
        z = origin[2] + k * sz
        ds.ImagePositionPatient = [f"{v:.6g}" for v in (origin[0], origin[1], z)]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.SliceLocation = f"{z:.6g}"
        ds.PositionReferenceIndicator = ""
        ds.PixelSpacing = [f"{sy:.6g}", f"{sx:.6g}"]          # [row spacing (y), column spacing (x)]
        ds.SliceThickness = ds.SpacingBetweenSlices = f"{sz:.6g}"
        ds.KVP = "120"
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = Y, X
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, pr
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = intercept, 1, "HU"
        ds.WindowCenter, ds.WindowWidth = -600, 1500
        ds.PixelData = np.ascontiguousarray(stored[k]).tobytes()
        p = out / f"slice_{k:04d}.dcm"
        ds.save_as(p, write_like_original=False)
        paths.append(p)
    return paths


def _read_header(path):
    """Header of a DICOM image file (pixel data deferred), or None if not an image."""
    try:
        with warnings.catch_warnings():       # DICOMDIR deprecation / transfer-syntax chatter
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(str(path), defer_size=1024)
    except (InvalidDicomError, OSError, ValueError, EOFError, TypeError, KeyError, AttributeError):
        return None
    try:
        if ("PixelData" not in ds or "SeriesInstanceUID" not in ds or "Rows" not in ds
                or str(ds.get("SOPClassUID", "")) in _NON_IMAGE_SOP or ds.get("Modality", "") in _NON_IMAGE_MODALITY):
            return None
    except Exception:   # malformed elements
        return None
    return ds


def find_series(root) -> dict[str, list[Path]]:
    """Walk ``root`` (any nesting) and group DICOM image files by SeriesInstanceUID.

    Non-DICOM files, DICOMDIRs, and objects without pixel data (SR, PR, KO ...) or
    segmentation objects are skipped. File lists are sorted by path (not geometry).
    """
    out = defaultdict(list)
    for dirpath, _, files in os.walk(root):
        for name in sorted(files):
            p = Path(dirpath) / name
            ds = _read_header(p)
            if ds is not None:
                out[str(ds.SeriesInstanceUID)].append(p)
    return {k: sorted(v) for k, v in sorted(out.items())}


def read_series(folder, series_uid: str | None = None) -> tuple[np.ndarray, dict]:
    """Read one DICOM image series into a ``[z, y, x]`` array with rescale applied (HU for CT).

    ``folder`` is a directory (searched recursively) or a list of files. If it holds several
    series, pass ``series_uid``. Slices are sorted by position along the slice normal
    (``ImagePositionPatient`` . (row x col)), falling back to InstanceNumber when positions are
    missing. The array is int16 when rescale is exact and fits, float32 otherwise.

    Geometry (all tuples in x, y, z order, LPS mm): ``spacing``, ``origin`` (position of voxel
    [0,0,0]), ``direction`` (3x3 row-major, columns = index axes, as SimpleITK), ``positions``
    (slice offsets along the normal), ``uniform`` (equal slice gaps), plus ``series_uid``,
    ``study_uid``, ``modality``, ``patient_id``, ``frame_of_reference_uid``, ``files``.
    """
    if isinstance(folder, (str, os.PathLike)):
        series = find_series(folder)
        if not series:
            raise ValueError(f"no DICOM image series under {folder}")
        if series_uid is None:
            if len(series) > 1:
                raise ValueError(f"{folder} holds {len(series)} series; pass series_uid= one of {list(series)}")
            series_uid = next(iter(series))
        if series_uid not in series:
            raise ValueError(f"series {series_uid} not found under {folder}")
        files = series[series_uid]
    else:
        files = [Path(f) for f in folder]
    hdrs = [(p, _read_header(p)) for p in files]
    hdrs = [(p, d) for p, d in hdrs if d is not None and (series_uid is None or d.SeriesInstanceUID == series_uid)]
    if not hdrs:
        raise ValueError("no DICOM image files to read")
    d0 = hdrs[0][1]
    if len({d.SeriesInstanceUID for _, d in hdrs}) > 1:
        raise ValueError("files belong to several series; pass series_uid")
    iop = np.array([float(v) for v in d0.get("ImageOrientationPatient", [1, 0, 0, 0, 1, 0])])
    for p, d in hdrs:
        o = np.array([float(v) for v in d.get("ImageOrientationPatient", [1, 0, 0, 0, 1, 0])])
        if not np.allclose(o, iop, atol=1e-4):
            raise ValueError(f"series mixes slice orientations ({p.name}: {list(o)} vs {list(iop)}), "
                             "e.g. a multi-plane localizer; it is not one volume")
        if (d.Rows, d.Columns) != (d0.Rows, d0.Columns):
            raise ValueError(f"series mixes image sizes ({p.name})")
        if int(d.get("NumberOfFrames", 1) or 1) > 1 and len(hdrs) > 1:
            raise ValueError("multi-frame files in a multi-file series are not supported")
    row, col = iop[:3], iop[3:]
    normal = np.cross(row, col)
    has_pos = all("ImagePositionPatient" in d for _, d in hdrs)
    if has_pos:
        key = [float(np.dot(normal, [float(v) for v in d.ImagePositionPatient])) for _, d in hdrs]
    else:
        key = [float(d.get("InstanceNumber", i) or i) for i, (_, d) in enumerate(hdrs)]
    order = np.argsort(key, kind="stable")
    hdrs = [hdrs[i] for i in order]
    key = [key[i] for i in order]
    ps = [float(v) for v in d0.get("PixelSpacing", d0.get("ImagerPixelSpacing", [1, 1]))]
    gaps = np.diff(key) if has_pos else np.array([])
    if len(gaps):
        sz = float(np.median(gaps))
    else:
        sz = float(d0.get("SpacingBetweenSlices", 0) or d0.get("SliceThickness", 0) or 1.0)
    uniform = bool(len(gaps) == 0 or np.allclose(gaps, sz, rtol=1e-3, atol=1e-3))
    slices, exact = [], True
    for _, d in hdrs:
        a = d.pixel_array
        slope, inter = float(d.get("RescaleSlope", 1) or 1), float(d.get("RescaleIntercept", 0) or 0)
        exact &= slope == 1 and inter == int(inter)
        a = a.astype(np.float64) * slope + inter
        slices.extend(a if a.ndim == 3 and int(d.get("NumberOfFrames", 1) or 1) > 1 else [a])
    vol = np.stack(slices).astype(np.float64)
    if exact and vol.min() >= -32768 and vol.max() <= 32767:
        vol = vol.astype(np.int16)
    else:
        vol = vol.astype(np.float32)
    origin = tuple(float(v) for v in hdrs[0][1].get("ImagePositionPatient", [0, 0, 0]))
    direction = tuple(float(v) for v in np.stack([row, col, normal], axis=1).ravel())
    geom = {
        "spacing": (ps[1], ps[0], sz), "origin": origin, "direction": direction,
        "positions": [k - key[0] for k in key] if has_pos else None, "uniform": uniform,
        "series_uid": str(d0.SeriesInstanceUID), "study_uid": str(d0.get("StudyInstanceUID", "")),
        "modality": str(d0.get("Modality", "")), "patient_id": str(d0.get("PatientID", "")),
        "frame_of_reference_uid": str(d0.get("FrameOfReferenceUID", "")),
        "files": [str(p) for p, _ in hdrs],
    }
    return vol, geom


def to_sitk(volume: np.ndarray, geometry: dict):
    """SimpleITK image of a ``[z, y, x]`` array with ``spacing``/``origin``/``direction`` from geometry."""
    import SimpleITK as sitk
    img = sitk.GetImageFromArray(volume)
    img.SetSpacing(tuple(float(s) for s in geometry["spacing"]))
    img.SetOrigin(tuple(float(s) for s in geometry.get("origin", (0, 0, 0))))
    if geometry.get("direction") is not None:
        img.SetDirection(tuple(float(s) for s in geometry["direction"]))
    return img
