"""The DICOM and JSON a batch writes for one series, and the checks they pass before they count.

- SEG: `clinlens.data.dicom_seg.build_seg` (highdicom), one segment per text prompt that found a
  region, frames in SimpleITK/GDCM order over the source instances.
- Heatmaps: a highdicom Parametric Map (float32 frames in [0, 1], one per source slice, a real
  world value mapping "heat", no units), one object per explained target; projection images without
  a frame of reference (CR, DX) get a Secondary Capture per image instead.
- Results: a Comprehensive 3D SR with a TID 1500 Measurement Report. The class and concept results
  are an image-level group (TID 1501, "Measurements and Qualitative Evaluations") whose finding type
  and qualitative evaluation ("predicted class") are the predicted class, with the class
  probabilities and concept scores as measurements and the key slice as its source image. Each
  segment gets a volumetric group (TID 1411) referencing the SEG segment, with its volume in mm3
  and its text-match score. TID 1500
  is the template highdicom implements for exactly this shape (algorithm results tied to image
  regions, readable by dcmqi/OHIF); Comprehensive 3D SR is the IOD highdicom pairs with it. The
  report's image library lists every source instance, so the SR references the whole source series
  (when a source lacks SliceThickness there is no library and the sources are "other evidence").
  Class, concept and prompt names are private codes (scheme ``99CLINLENS``), so no wrong SNOMED
  code is ever claimed.
- `check_derived` verifies a derived object against its sources: referenced instances, Frame of
  Reference, frame count, per-frame positions, orientation and pixel spacing.
- Every file is written to a temporary name in the same folder and then `os.replace`d, so a reader
  (or a resumed batch) never sees half a file.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pydicom

import clinlens
from clinlens.models.checkpoint import atomic_write

PRIVATE_SCHEME = "99CLINLENS"
SERIES_NUMBERS = {"seg": 900, "heatmap": 910, "sr": 920}


# ----------------------------------------------------------------------------- atomic files
def _atomic(path, write) -> Path:
    """`write(binary file)` to a temp file beside `path`, fsync, then rename onto it (`checkpoint.atomic_write`)."""
    def to_file(tmp):
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())

    atomic_write(path, to_file)
    return Path(path)


def atomic_write_bytes(path, data: bytes) -> Path:
    return _atomic(path, lambda f: f.write(data))


def atomic_write_text(path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path, obj) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=1, default=_json_default) + "\n")


def atomic_save_dataset(ds, path) -> Path:
    """A pydicom dataset saved atomically (with file meta)."""
    return _atomic(path, lambda f: ds.save_as(f, write_like_original=False))


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


# ----------------------------------------------------------------------------- codes
def private_code(meaning: str, prefix: str = "C"):
    """A stable private code for a class, concept or prompt name (value <= 16 chars, meaning <= 64)."""
    import highdicom as hd

    value = prefix + hashlib.sha1(meaning.encode()).hexdigest()[:12].upper()
    return hd.sr.CodedConcept(value=value, scheme_designator=PRIVATE_SCHEME, meaning=meaning[:64])


def _algorithm(name: str):
    import highdicom as hd

    return hd.sr.AlgorithmIdentification(name=name, version=clinlens.__version__)


# ----------------------------------------------------------------------------- geometry check
class GeometryError(ValueError):
    """A derived object that does not sit on its source series."""


def _frame_refs(ds) -> list[str | None]:
    refs = []
    for fg in ds.PerFrameFunctionalGroupsSequence:
        uid = None
        for di in fg.get("DerivationImageSequence", []):
            for si in di.get("SourceImageSequence", []):
                uid = str(si.ReferencedSOPInstanceUID)
        refs.append(uid)
    return refs


def check_derived(ds, sources, per_frame_sources: bool = True) -> dict:
    """Check a SEG or parametric map against its source datasets (in frame order).

    - every referenced instance (ReferencedSeriesSequence) is a source instance of the same series;
    - same Frame of Reference; one frame per source slice (per segment for a SEG) (`per_frame_sources`);
    - each frame's ImagePositionPatient equals its source's (the source it names when the frame has
      a derivation reference, else the source at the same index); same orientation and pixel spacing.
    Returns a summary; raises `GeometryError` naming the first mismatch.
    """
    src_by_uid = {str(s.SOPInstanceUID): s for s in sources}
    series = {str(s.SeriesInstanceUID) for s in sources}
    refs = ds.get("ReferencedSeriesSequence", [])
    if not refs:
        raise GeometryError("no ReferencedSeriesSequence")
    ref_uids = set()
    for r in refs:
        if str(r.SeriesInstanceUID) not in series:
            raise GeometryError(f"references series {r.SeriesInstanceUID}, not the source {sorted(series)}")
        ref_uids |= {str(i.ReferencedSOPInstanceUID) for i in r.ReferencedInstanceSequence}
    if not ref_uids <= set(src_by_uid):
        raise GeometryError(f"references {len(ref_uids - set(src_by_uid))} instance(s) outside the source series")
    s0 = sources[0]
    if "FrameOfReferenceUID" in s0 and str(ds.get("FrameOfReferenceUID", "")) != str(s0.FrameOfReferenceUID):
        raise GeometryError("Frame of Reference differs from the source series")
    n = int(ds.get("NumberOfFrames", 1))
    layers = len(ds.SegmentSequence) if "SegmentSequence" in ds else 1   # a SEG stacks one frame set per segment
    if per_frame_sources and n != layers * len(sources):
        raise GeometryError(f"{n} frames for {len(sources)} source slices x {layers} segment(s)")
    out = {"frames": n, "referenced_instances": len(ref_uids), "positions_checked": 0}
    if "ImagePositionPatient" not in s0:
        return out  # projection images: no patient-space geometry to compare
    shared = ds.SharedFunctionalGroupsSequence[0]
    if "PlaneOrientationSequence" in shared:
        iop = [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient]
        if not np.allclose(iop, [float(v) for v in s0.ImageOrientationPatient], atol=1e-4):
            raise GeometryError(f"orientation {iop} differs from the source {list(s0.ImageOrientationPatient)}")
    if "PixelMeasuresSequence" in shared:
        ps = [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing]
        if not np.allclose(ps, [float(v) for v in s0.PixelSpacing], atol=1e-4):
            raise GeometryError(f"pixel spacing {ps} differs from the source {list(s0.PixelSpacing)}")
    frame_refs = _frame_refs(ds)
    for k, fg in enumerate(ds.PerFrameFunctionalGroupsSequence):
        src = src_by_uid.get(frame_refs[k]) if frame_refs[k] else sources[k % len(sources)]
        if src is None:
            raise GeometryError(f"frame {k + 1} has no source instance")
        pos = [float(v) for v in fg.PlanePositionSequence[0].ImagePositionPatient]
        want = [float(v) for v in src.ImagePositionPatient]
        if not np.allclose(pos, want, atol=1e-3):
            raise GeometryError(f"frame {k + 1} at {pos} but its source {src.SOPInstanceUID} is at {want}")
        out["positions_checked"] += 1
    return out


# ----------------------------------------------------------------------------- SEG
def seg_dataset(stage_dir, label: np.ndarray, names: dict[int, str], sources, seed: str):
    """DICOM SEG (highdicom, via `build_seg`) of a [z, y, x] labelmap in `sources`' order, checked."""
    from clinlens.data.dicom_seg import build_seg

    seg = build_seg(stage_dir, label, names, series_description="clinlens batch SEG", seed_uid=seed)
    check_derived(seg, sources)
    return seg


# ----------------------------------------------------------------------------- heatmaps
def heatmap_datasets(sources, heat: np.ndarray, target: str, method: str, seed: str, index: int = 0) -> list:
    """A float32 [z, y, x] heat volume in [0, 1] over `sources` (same order), as DICOM.

    Sources in a patient frame of reference: ONE Parametric Map (float frames, one per slice).
    Projection images without one (CR, DX): a Secondary Capture per slice (heat x 255, 8 bit) that
    names its source image; a parametric map needs a frame of reference."""
    heat = np.clip(np.asarray(heat, np.float32), 0.0, 1.0)
    if heat.ndim == 2:
        heat = heat[None]
    want = (len(sources), int(sources[0].Rows), int(sources[0].Columns))
    if heat.shape != want:
        raise ValueError(f"heatmap shape {heat.shape} does not match the series {want}")
    if "FrameOfReferenceUID" in sources[0] and "ImagePositionPatient" in sources[0]:
        return [parametric_map(sources, heat, target, method, seed, index)]
    return [secondary_capture(src, heat[k], target, method, seed, index, k) for k, src in enumerate(sources)]


def parametric_map(sources, heat: np.ndarray, target: str, method: str, seed: str, index: int = 0):
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from clinlens.data.dicom_io import derived_uid

    mapping = hd.pm.RealWorldValueMapping(
        lut_label="heat", lut_explanation=f"{method} evidence for '{target}' (0 none, 1 max over the series)"[:64],
        unit=codes.UCUM.NoUnits, value_range=(0.0, 1.0), slope=1.0, intercept=0.0)
    pm = hd.pm.ParametricMap(
        source_images=list(sources), pixel_array=heat,
        series_instance_uid=derived_uid(seed, "heatmap-series", index), series_number=SERIES_NUMBERS["heatmap"] + index,
        sop_instance_uid=derived_uid(seed, "heatmap-sop", index), instance_number=1,
        manufacturer="clinlens", manufacturer_model_name="clinlens", software_versions=clinlens.__version__,
        device_serial_number="0", contains_recognizable_visual_features=False,
        real_world_value_mappings=[mapping], window_center=0.5, window_width=1.0,
        content_label="HEATMAP", content_description=f"{method}: {target}"[:64],
        series_description=f"clinlens heatmap {target}"[:64],
    )
    check_derived(pm, sources)
    return pm


def secondary_capture(source, heat2d: np.ndarray, target: str, method: str, seed: str, index: int, k: int):
    import highdicom as hd
    from pydicom.dataset import Dataset

    from clinlens.data.dicom_io import derived_uid

    orient = [str(v) for v in (source.get("PatientOrientation") or [])]
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source, pixel_array=np.round(np.asarray(heat2d) * 255).astype(np.uint8),
        photometric_interpretation="MONOCHROME2", bits_allocated=8,
        coordinate_system="PATIENT" if len(orient) == 2 else None,
        patient_orientation=tuple(orient) if len(orient) == 2 else None,
        series_instance_uid=derived_uid(seed, "heatmap-series", index), series_number=SERIES_NUMBERS["heatmap"] + index,
        sop_instance_uid=derived_uid(seed, "heatmap-sop", index, k), instance_number=k + 1, manufacturer="clinlens",
        pixel_spacing=tuple(float(v) for v in source.PixelSpacing) if "PixelSpacing" in source else None,
        series_description=f"clinlens heatmap {target}"[:64])
    ref = Dataset()
    ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = source.SOPClassUID, source.SOPInstanceUID
    sc.SourceImageSequence = [ref]
    sc.DerivationDescription = f"{method} heatmap for '{target}', 0-255 = heat 0-1"[:1024]
    sc.ImageComments = f"{method}: {target}"[:10240]
    check_secondary(sc, source)
    return sc


def check_secondary(sc, source) -> dict:
    """A secondary-capture heatmap names its source image and has its size."""
    refs = [str(r.ReferencedSOPInstanceUID) for r in sc.get("SourceImageSequence", [])]
    if refs != [str(source.SOPInstanceUID)]:
        raise GeometryError("the secondary capture does not reference its source image")
    if (int(sc.Rows), int(sc.Columns)) != (int(source.Rows), int(source.Columns)):
        raise GeometryError(f"secondary capture {sc.Rows}x{sc.Columns} vs source {source.Rows}x{source.Columns}")
    if str(sc.StudyInstanceUID) != str(source.StudyInstanceUID):
        raise GeometryError("secondary capture in another study")
    return {"frames": 1, "referenced_instances": 1}


# ----------------------------------------------------------------------------- SR
def _procedure(modality: str):
    import highdicom as hd
    from pydicom.sr.codedict import codes

    if modality.upper() == "CT":
        return codes.LN.CTUnspecifiedBodyRegion
    return hd.sr.CodedConcept(value="363679005", scheme_designator="SCT", meaning="Imaging")


_CROSS_SECTIONAL = {"CT", "MR", "PT"}


def image_library(sources, slice_spacing: float | None = None) -> list | None:
    """The sources as highdicom's image library wants them, or None when it cannot be built.

    highdicom 0.22 describes CT/MR/PT entries with SpacingBetweenSlices and SliceThickness. A source
    without SpacingBetweenSlices gets the spacing measured from the validated slice positions (on a
    copy: the source is not changed); one without SliceThickness (unknown, not derivable) means no
    image library, and the sources are then only evidence."""
    out = []
    for s in sources:
        if str(s.get("Modality", "")).upper() in _CROSS_SECTIONAL:
            if "SliceThickness" not in s or s.SliceThickness in (None, ""):
                return None
            if "SpacingBetweenSlices" not in s:
                if not slice_spacing:
                    return None
                s = copy.copy(s)
                s.SpacingBetweenSlices = f"{float(slice_spacing):.6g}"
        out.append(s)
    return out


def sr_dataset(sources, seed: str, classification: dict | None = None, seg=None, segments: list | None = None,
               slice_spacing: float | None = None):
    """Comprehensive 3D SR (TID 1500) with the classification group and one group per SEG segment.

    `classification`: {"family", "key_slice", "classes": [{"class", "probability"}], "concepts":
    [{"concept", "score"}]} with classes sorted by probability. `segments`: [{"segment_number",
    "prompt", "score", "volume_mm3"}] of `seg`."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from clinlens.data.dicom_io import derived_uid

    s0 = sources[0]
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=derived_uid("clinlens-device", clinlens.__version__), name="clinlens",
            manufacturer_name="clinlens", model_name="clinlens batch"))
    groups = []
    if classification:
        top = classification["classes"][0]
        k = int(classification.get("key_slice", 0))
        meas = [hd.sr.Measurement(name=private_code(f"probability {c['class']}", "P"), value=float(c["probability"]),
                                  unit=codes.UCUM.NoUnits, algorithm_id=_algorithm("clinlens CSR"))
                for c in classification["classes"]]
        meas += [hd.sr.Measurement(name=private_code(f"concept score {c['concept']}", "S"), value=float(c["score"]),
                                   unit=codes.UCUM.NoUnits, algorithm_id=_algorithm("clinlens CSR"))
                 for c in classification["concepts"]]
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=derived_uid(seed, "sr-class-group"),
                                                         identifier="clinlens classification"),
            algorithm_id=_algorithm("clinlens CSR"), finding_type=private_code(top["class"], "K"),
            qualitative_evaluations=[hd.sr.QualitativeEvaluation(name=private_code("predicted class", "Q"),
                                                                 value=private_code(top["class"], "K"))],
            measurements=meas,
            source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(sources[min(k, len(sources) - 1)])],
        ))
    for s in segments or []:
        ref = hd.sr.ReferencedSegment(sop_class_uid=seg.SOPClassUID, sop_instance_uid=seg.SOPInstanceUID,
                                      segment_number=int(s["segment_number"]),
                                      source_series=hd.sr.SourceSeriesForSegmentation(str(s0.SeriesInstanceUID)))
        groups.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=derived_uid(seed, "sr-seg-group", s["segment_number"]),
                identifier=f"segment {s['segment_number']}: {s['prompt']}"[:64]),
            referenced_segment=ref, finding_type=private_code(s["prompt"], "F"),
            algorithm_id=_algorithm("clinlens text segmentation"),
            measurements=[
                hd.sr.Measurement(name=codes.SCT.Volume, value=float(s["volume_mm3"]), unit=codes.UCUM.CubicMillimeter),
                hd.sr.Measurement(name=private_code("text match score", "M"), value=float(s["score"]),
                                  unit=codes.UCUM.NoUnits, algorithm_id=_algorithm("clinlens text segmentation")),
            ]))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=_procedure(str(s0.get("Modality", ""))), imaging_measurements=groups,
        referenced_images=image_library(sources, slice_spacing))   # the image library: every source instance
    evidence = list(sources) + ([seg] if seg is not None else [])
    return hd.sr.Comprehensive3DSR(
        evidence=evidence, content=report[0], series_instance_uid=derived_uid(seed, "sr-series"),
        series_number=SERIES_NUMBERS["sr"], sop_instance_uid=derived_uid(seed, "sr-sop"), instance_number=1,
        manufacturer="clinlens", is_complete=True, series_description="clinlens batch results")


def check_sr(sr, sources, seg=None) -> dict:
    """The SR's evidence references the source series (its instances only) and, when given, the SEG."""
    ev = [*sr.get("CurrentRequestedProcedureEvidenceSequence", []), *sr.get("PertinentOtherEvidenceSequence", [])]
    refs = {}
    for study in ev:
        for ser in study.ReferencedSeriesSequence:
            refs[str(ser.SeriesInstanceUID)] = {str(i.ReferencedSOPInstanceUID) for i in ser.ReferencedSOPSequence}
    src_series = str(sources[0].SeriesInstanceUID)
    if src_series not in refs:
        raise GeometryError("the SR evidence does not reference the source series")
    if not refs[src_series] <= {str(s.SOPInstanceUID) for s in sources}:
        raise GeometryError("the SR evidence names instances outside the source series")
    if seg is not None and str(seg.SeriesInstanceUID) not in refs:
        raise GeometryError("the SR evidence does not reference the SEG")
    return {"evidence_series": sorted(refs)}


def read_dicom(path) -> pydicom.Dataset:
    return pydicom.dcmread(str(path))
