"""Find the series a batch runs on, and say why the others cannot run.

- A folder (any nesting, mixed studies and series) is scanned file by file: DICOM image instances
  are grouped by SeriesInstanceUID; non-DICOM files and non-image objects (SR, SEG, KO, PR, RT,
  DICOMDIR, ...) are skipped and counted; a corrupted file, a truncated one (pixel data shorter than
  its header says) or one whose transfer syntax no installed pixel handler decodes becomes an
  `ErrorRecord` and fails its series.
- A DICOMweb URL (e.g. Orthanc's `/dicom-web`) is searched with QIDO-RS; its series are fetched by
  the per-series function (`clinlens.batch.process`), which validates them the same way.
- `validate_headers` is the one geometry check, used here and by the per-series function: one
  orientation, one image size and pixel spacing, no duplicate positions, no gap larger than 1.5x the
  median slice spacing (missing slices), otherwise equal spacing (inconsistent spacing), at least
  one instance with pixel data (empty series).
- `Selection` picks series by StudyInstanceUID, SeriesInstanceUID, modality, or a list file.
"""
from __future__ import annotations

import csv
import os
import warnings
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from clinlens.data.dicom_io import _NON_IMAGE_MODALITY, _NON_IMAGE_SOP

MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"  # DICOMDIR
# further SOP classes without a reconstructable image
_NON_IMAGE_SOP_EXTRA = {
    MEDIA_STORAGE_DIRECTORY,
    "1.2.840.10008.5.1.4.1.1.30",        # Parametric Map (a derived object, e.g. our own heatmaps)
    "1.2.840.10008.5.1.4.1.1.481.2",     # RT Dose
    "1.2.840.10008.5.1.4.1.1.481.3",     # RT Structure Set
    "1.2.840.10008.5.1.4.1.1.481.5",     # RT Plan
}
GAP_FACTOR = 1.5          # a gap above 1.5x the median spacing means missing slices
SPACING_RTOL = 0.02       # slice gaps must agree within 2% (or 0.01 mm)

# error kinds (stable strings: the error report and the CSV carry them)
CORRUPTED = "corrupted"
TRUNCATED = "truncated"
UNSUPPORTED_TS = "unsupported_transfer_syntax"
MISSING_SLICES = "missing_slices"
INCONSISTENT_SPACING = "inconsistent_spacing"
INCONSISTENT_ORIENTATION = "inconsistent_orientation"
INCONSISTENT_GEOMETRY = "inconsistent_geometry"
EMPTY_SERIES = "empty_series"
NOT_FOUND = "not_found"
FETCH_FAILED = "fetch_failed"
PROCESSING_FAILED = "processing_failed"
STOW_FAILED = "stow_failed"


class SeriesError(Exception):
    """A series that cannot be processed, with the error kind and a reason a person can act on."""

    def __init__(self, kind: str, reason: str, files: list[str] | None = None):
        super().__init__(reason)
        self.kind, self.reason, self.files = kind, reason, list(files or [])


@dataclass
class ErrorRecord:
    """One entry of the error report: a series (by UID) or a file, what went wrong and why."""

    kind: str
    reason: str
    series_uid: str = ""
    study_uid: str = ""
    file: str = ""
    stage: str = "discover"   # discover | validate | process | stow
    modality: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class SeriesSpec:
    """What the per-series function needs to load one series (picklable; no open handles)."""

    series_uid: str
    study_uid: str = ""
    modality: str = ""
    patient_id: str = ""
    description: str = ""
    files: tuple = ()                # folder source: the series' instance files
    url: str = ""                    # DICOMweb source: the server root (".../dicom-web")
    n_instances: int = 0

    @property
    def source(self) -> str:
        return "dicomweb" if self.url else "folder"


@dataclass
class Selection:
    """Which series to run: all conditions given must hold (UIDs within a list are alternatives)."""

    study_uids: set = field(default_factory=set)
    series_uids: set = field(default_factory=set)
    modalities: set = field(default_factory=set)

    @classmethod
    def build(cls, studies=(), series=(), modalities=(), series_file=None) -> "Selection":
        uids = set(series or ())
        if series_file:
            uids |= read_series_list(series_file)
        return cls(set(studies or ()), uids, {m.upper() for m in (modalities or ())})

    def wants(self, study_uid: str, series_uid: str, modality: str) -> bool:
        return ((not self.study_uids or study_uid in self.study_uids)
                and (not self.series_uids or series_uid in self.series_uids)
                and (not self.modalities or modality.upper() in self.modalities))


def read_series_list(path) -> set[str]:
    """SeriesInstanceUIDs from a file: one per line (``#`` comments), or a CSV with a
    ``SeriesInstanceUID`` (or ``series_uid``) column."""
    text = Path(path).read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    if lines and "," in lines[0]:
        rows = list(csv.DictReader(lines))
        col = next((c for c in (rows[0].keys() if rows else []) if c.strip() in ("SeriesInstanceUID", "series_uid")),
                   None)
        if col is None:
            raise ValueError(f"{path}: a CSV series list needs a SeriesInstanceUID column")
        return {r[col].strip() for r in rows if r.get(col, "").strip()}
    return {ln.split()[0] for ln in lines}


# ----------------------------------------------------------------------------- transfer syntaxes
def transfer_syntax_supported(ts) -> bool:
    """True when pydicom can decode pixel data in `ts` with the handlers installed here."""
    ts = pydicom.uid.UID(str(ts))
    if ts in pydicom.uid.UncompressedTransferSyntaxes or ts == pydicom.uid.DeflatedExplicitVRLittleEndian:
        return True
    for h in pydicom.config.pixel_data_handlers:
        try:
            if h.is_available() and h.supports_transfer_syntax(ts):
                return True
        except Exception:  # noqa: BLE001 (a broken optional handler is simply not available)
            continue
    return False


def _ts_name(ts) -> str:
    uid = pydicom.uid.UID(str(ts))
    return f"{uid.name} ({uid})" if uid.name != str(uid) else str(uid)


# ----------------------------------------------------------------------------- one file
@dataclass
class FileInfo:
    """The header facts grouping and validation need (no pixel data kept)."""

    path: str
    series_uid: str
    study_uid: str
    modality: str
    sop_uid: str
    patient_id: str = ""
    description: str = ""
    has_pixels: bool = True
    rows: int = 0
    columns: int = 0
    frames: int = 1
    iop: tuple | None = None
    ipp: tuple | None = None
    pixel_spacing: tuple | None = None
    instance_number: int | None = None
    problem: tuple | None = None      # (kind, reason) when the file cannot be used


def _floats(v) -> tuple | None:
    try:
        return tuple(float(x) for x in v) if v is not None else None
    except (TypeError, ValueError):
        return None


def expected_pixel_bytes(ds) -> int:
    """Bytes of native (uncompressed) pixel data the header announces."""
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    bits = int(ds.BitsAllocated)
    n = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1) or 1) * frames
    return (n * bits + 7) // 8


def info_from_dataset(ds, path: str = "", file_size: int | None = None) -> FileInfo | None:
    """`FileInfo` of a parsed header; None for a non-image object (skipped, not an error).

    `file_size` (bytes on disk) enables the truncation check of deferred pixel data."""
    meta = getattr(ds, "file_meta", None)
    sop_class = str(ds.get("SOPClassUID", "") or (meta.get("MediaStorageSOPClassUID", "") if meta else ""))
    if sop_class in _NON_IMAGE_SOP or sop_class in _NON_IMAGE_SOP_EXTRA or "DirectoryRecordSequence" in ds:
        return None
    modality = str(ds.get("Modality", "") or "")
    if modality.upper() in _NON_IMAGE_MODALITY or modality.upper() in ("RTDOSE", "RTIMAGE"):
        return None
    if "SeriesInstanceUID" not in ds:
        if not sop_class:
            return None  # not an instance at all
        return FileInfo(path, "", str(ds.get("StudyInstanceUID", "")), modality, str(ds.get("SOPInstanceUID", "")),
                        problem=(TRUNCATED if file_size else CORRUPTED, "header ends before SeriesInstanceUID"))
    fi = FileInfo(
        path=path, series_uid=str(ds.SeriesInstanceUID), study_uid=str(ds.get("StudyInstanceUID", "")),
        modality=modality, sop_uid=str(ds.get("SOPInstanceUID", "")), patient_id=str(ds.get("PatientID", "")),
        description=str(ds.get("SeriesDescription", "")), has_pixels="PixelData" in ds,
        iop=_floats(ds.get("ImageOrientationPatient")), ipp=_floats(ds.get("ImagePositionPatient")),
        pixel_spacing=_floats(ds.get("PixelSpacing", ds.get("ImagerPixelSpacing"))),
    )
    try:
        fi.instance_number = int(ds.get("InstanceNumber")) if ds.get("InstanceNumber") not in (None, "") else None
    except (TypeError, ValueError):
        fi.instance_number = None
    if not fi.has_pixels:
        return fi
    try:
        fi.rows, fi.columns = int(ds.Rows), int(ds.Columns)
        fi.frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (AttributeError, TypeError, ValueError):
        fi.problem = (CORRUPTED, "pixel data without a valid Rows/Columns")
        return fi
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    if ts is not None and not transfer_syntax_supported(ts):
        fi.problem = (UNSUPPORTED_TS, f"transfer syntax {_ts_name(ts)} cannot be decoded with the installed "
                                      "pixel data handlers")
        return fi
    compressed = ts is not None and pydicom.uid.UID(str(ts)).is_compressed
    if not compressed:
        try:
            want = expected_pixel_bytes(ds)
        except (AttributeError, TypeError, ValueError):
            fi.problem = (CORRUPTED, "pixel data without BitsAllocated")
            return fi
        elem = ds._dict.get(0x7FE00010)  # raw (possibly deferred) element: no pixel bytes read
        have = None
        if elem is not None and getattr(elem, "value", None) is None and file_size is not None:
            tell, length = getattr(elem, "value_tell", None), getattr(elem, "length", None)
            if tell is not None and length is not None and length != 0xFFFFFFFF:
                have = min(int(length), max(0, file_size - int(tell)))
        if have is None:
            have = len(ds.PixelData)
        if have < want:
            fi.problem = (TRUNCATED, f"pixel data has {have} of {want} bytes (file truncated)")
    return fi


def inspect_file(path) -> FileInfo | ErrorRecord | None:
    """Read one file's header. FileInfo for an image instance, None for something to skip (not DICOM,
    not an image), ErrorRecord for a file that claims to be DICOM but cannot be parsed."""
    path = str(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError as e:
        return ErrorRecord(CORRUPTED, f"cannot read: {e}", file=path)
    magic = len(head) == 132 and head[128:132] == b"DICM"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, defer_size=1024, force=False)
    except InvalidDicomError:
        if path.lower().endswith((".dcm", ".dicom")):
            return ErrorRecord(CORRUPTED, "named like DICOM but is not a DICOM file (no DICM prefix)", file=path)
        return None  # README.txt and friends
    except Exception as e:  # noqa: BLE001 (pydicom raises many types on damaged files)
        return ErrorRecord(CORRUPTED if size > 132 else TRUNCATED, f"unreadable DICOM ({type(e).__name__}: {e})"[:300],
                           file=path)
    meta = getattr(ds, "file_meta", None)
    if magic and not (ds.get("SOPClassUID") or (meta is not None and meta.get("MediaStorageSOPClassUID"))):
        return ErrorRecord(CORRUPTED, "DICOM prefix but no SOP Class UID: the header is damaged", file=path)
    try:
        return info_from_dataset(ds, path, size)
    except Exception as e:  # noqa: BLE001 (malformed elements)
        return ErrorRecord(CORRUPTED, f"malformed header ({type(e).__name__}: {e})"[:300], file=path)


# ----------------------------------------------------------------------------- geometry
def _slice_key(info: FileInfo, normal) -> float | None:
    return None if info.ipp is None else float(np.dot(normal, info.ipp))


def validate_headers(infos: list[FileInfo]) -> list[FileInfo]:
    """The instances of one series in slice order, or a `SeriesError` saying why it is not one volume.

    Order: position along the slice normal (InstanceNumber when positions are missing).
    """
    bad = [i for i in infos if i.problem]
    if bad:
        kinds = sorted({i.problem[0] for i in bad})
        kind = kinds[0] if len(kinds) == 1 else CORRUPTED
        names = ", ".join(Path(i.path).name for i in bad[:5]) + (" ..." if len(bad) > 5 else "")
        raise SeriesError(kind, f"{len(bad)} of {len(infos)} instance(s) unusable ({bad[0].problem[1]}): {names}",
                          [i.path for i in bad])
    imgs = [i for i in infos if i.has_pixels]
    if not imgs:
        raise SeriesError(EMPTY_SERIES, f"empty series: {len(infos)} instance(s), none with pixel data")
    multi = [i for i in imgs if i.frames > 1]
    if multi and len(imgs) > 1:
        raise SeriesError(INCONSISTENT_GEOMETRY, "multi-frame instances in a multi-file series are not supported")
    sizes = {(i.rows, i.columns) for i in imgs}
    if len(sizes) > 1:
        raise SeriesError(INCONSISTENT_GEOMETRY, f"series mixes image sizes {sorted(sizes)}")
    spacings = {tuple(round(v, 4) for v in i.pixel_spacing) for i in imgs if i.pixel_spacing}
    if len(spacings) > 1:
        raise SeriesError(INCONSISTENT_SPACING, f"series mixes pixel spacings {sorted(spacings)}")
    iops = [i.iop for i in imgs if i.iop is not None]
    if iops:
        ref = np.asarray(iops[0])
        for i in imgs:
            if i.iop is None or not np.allclose(i.iop, ref, atol=1e-4):
                raise SeriesError(INCONSISTENT_ORIENTATION,
                                  f"series mixes slice orientations ({Path(i.path).name}: {list(i.iop or [])} vs "
                                  f"{list(ref)}), e.g. a localizer; it is not one volume")
    if len(imgs) == 1:
        return imgs
    has_pos = all(i.ipp is not None for i in imgs) and iops
    if not has_pos:
        return sorted(imgs, key=lambda i: (i.instance_number is None, i.instance_number or 0, i.path))
    normal = np.cross(np.asarray(iops[0][:3]), np.asarray(iops[0][3:]))
    keyed = sorted(imgs, key=lambda i: _slice_key(i, normal))
    pos = np.array([_slice_key(i, normal) for i in keyed])
    gaps = np.diff(pos)
    if (gaps < 1e-3).any():
        k = int(np.argmax(gaps < 1e-3))
        raise SeriesError(INCONSISTENT_SPACING, f"two instances share slice position {pos[k]:.3f} mm "
                                                f"({Path(keyed[k].path).name}, {Path(keyed[k + 1].path).name})")
    med = float(np.median(gaps))
    big = np.flatnonzero(gaps > GAP_FACTOR * med)
    if len(big):
        missing = int(sum(round(gaps[k] / med) - 1 for k in big))
        where = ", ".join(f"{pos[k]:.2f}->{pos[k + 1]:.2f} mm" for k in big[:3])
        raise SeriesError(MISSING_SLICES, f"missing slices: {len(big)} gap(s) > {GAP_FACTOR}x the median spacing "
                                          f"{med:.3f} mm ({where}; about {max(missing, 1)} slice(s) missing)")
    if not np.allclose(gaps, med, rtol=SPACING_RTOL, atol=1e-2):
        raise SeriesError(INCONSISTENT_SPACING, f"slice spacing varies from {gaps.min():.3f} to {gaps.max():.3f} mm "
                                                f"(median {med:.3f})")
    return keyed


# ----------------------------------------------------------------------------- sources
@dataclass
class Discovery:
    specs: list = field(default_factory=list)        # SeriesSpec, valid so far
    errors: list = field(default_factory=list)       # ErrorRecord
    skipped: int = 0                                 # non-image objects / non-DICOM files
    files: int = 0

    @property
    def failed_series(self) -> set:
        return {e.series_uid for e in self.errors if e.series_uid}


def _iter_files(root: Path):
    for dirpath, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            yield Path(dirpath) / name


def scan_folder(root, selection: Selection | None = None, exclude=()) -> Discovery:
    """Scan `root` (any nesting) into series specs (validated) and error records.

    `exclude`: folders not to scan (e.g. the batch's own output folder inside the input)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"input folder {root} does not exist")
    selection = selection or Selection()
    excl = [Path(e).resolve() for e in exclude]
    out = Discovery()
    groups: dict[str, list[FileInfo]] = defaultdict(list)
    for p in _iter_files(root):
        rp = p.resolve()
        if any(rp == e or e in rp.parents for e in excl):
            continue
        out.files += 1
        r = inspect_file(p)
        if r is None:
            out.skipped += 1
        elif isinstance(r, ErrorRecord):
            out.errors.append(r)
        elif not r.series_uid:   # damaged before the series is known: a file-level error only
            out.errors.append(ErrorRecord(r.problem[0], r.problem[1], study_uid=r.study_uid, file=r.path))
        else:
            groups[r.series_uid].append(r)
    for uid in sorted(groups):
        infos = groups[uid]
        d0 = infos[0]
        if not selection.wants(d0.study_uid, uid, d0.modality):
            continue
        for i in infos:
            if i.problem:
                out.errors.append(ErrorRecord(i.problem[0], i.problem[1], uid, i.study_uid, i.path))
        try:
            ordered = validate_headers(infos)
        except SeriesError as e:
            out.errors.append(ErrorRecord(e.kind, e.reason, uid, d0.study_uid, stage="validate",
                                          modality=d0.modality))
            continue
        out.specs.append(SeriesSpec(series_uid=uid, study_uid=d0.study_uid, modality=d0.modality,
                                    patient_id=d0.patient_id, description=d0.description,
                                    files=tuple(i.path for i in ordered), n_instances=len(ordered)))
    for uid in sorted(selection.series_uids - set(groups)):
        out.errors.append(ErrorRecord(NOT_FOUND, f"series listed for selection but not found under {root}", uid))
    return out


def _tag(item: dict, tag: str, default=""):
    v = item.get(tag, {}).get("Value")
    return v[0] if v else default


def _derived_object(client, study: str, series: str) -> bool:
    """True when the series' first instance is of a non-image SOP class (e.g. a heatmap we STOWed, OT)."""
    try:
        inst = client.search_for_instances(study, series, fields=["00080016"], limit=1)
    except Exception:  # noqa: BLE001 (a server without instance-level QIDO: fetch and see)
        return False
    sop = _tag(inst[0], "00080016") if inst else ""
    return sop in _NON_IMAGE_SOP or sop in _NON_IMAGE_SOP_EXTRA


def discover_dicomweb(url: str, selection: Selection | None = None, client=None) -> Discovery:
    """QIDO-RS series search on a DICOMweb server -> specs (validated after fetching, in the worker)."""
    from dicomweb_client import DICOMwebClient

    selection = selection or Selection()
    client = client or DICOMwebClient(url=url)
    filters_list = []
    base = {}
    if len(selection.modalities) == 1:
        base["Modality"] = next(iter(selection.modalities))
    if selection.series_uids:
        filters_list = [{**base, "SeriesInstanceUID": u} for u in sorted(selection.series_uids)]
    elif selection.study_uids:
        filters_list = [{**base, "StudyInstanceUID": u} for u in sorted(selection.study_uids)]
    else:
        filters_list = [base]
    out = Discovery()
    seen = set()
    for flt in filters_list:
        for item in client.search_for_series(search_filters=flt or None,
                                             fields=["Modality", "SeriesDescription", "PatientID",
                                                     "NumberOfSeriesRelatedInstances"]):
            uid, study = _tag(item, "0020000E"), _tag(item, "0020000D")
            modality = _tag(item, "00080060")
            if not uid or uid in seen or not selection.wants(study, uid, modality):
                continue
            if modality.upper() in _NON_IMAGE_MODALITY or _derived_object(client, study, uid):
                out.skipped += 1
                continue
            seen.add(uid)
            n = int(_tag(item, "00201209", 0) or 0)
            out.specs.append(SeriesSpec(series_uid=uid, study_uid=study, modality=modality,
                                        patient_id=str(_tag(item, "00100020", "")),
                                        description=str(_tag(item, "0008103E", "")), url=url, n_instances=n))
    for uid in sorted(selection.series_uids - seen):
        out.errors.append(ErrorRecord(NOT_FOUND, f"series listed for selection but not on {url}", uid))
    out.specs.sort(key=lambda s: (s.study_uid, s.series_uid))
    return out


def discover(source: str, selection: Selection | None = None, exclude=()) -> Discovery:
    """A folder path or a DICOMweb URL (http/https) -> `Discovery`."""
    if str(source).startswith(("http://", "https://")):
        return discover_dicomweb(str(source).rstrip("/"), selection)
    return scan_folder(source, selection, exclude=exclude)
