"""Orchestration of `clinlens batch`: discover, resume, dispatch, STOW, report.

`run_batch(...)` scans the source (`clinlens.batch.discover`), skips series whose outputs are
complete (`done.json` for the same configuration fingerprint), sends the rest to an executor
(`clinlens.batch.executors`) with a tqdm progress bar (rate and ETA over series), optionally STOWs
each finished series' DICOM outputs to a DICOMweb server, and writes, atomically, in the output
folder:

- ``summary.csv``: one row per series of the batch (ok, skipped, failed), across all studies;
- ``errors.json``: every failure with its kind, reason, series UID or file, and stage;
- ``batch.json``: counts, executor, timings and the configuration.

The exit code is 0 when nothing failed and 1 when anything did (a file, a series, a STOW).
"""
from __future__ import annotations

import csv
import io
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from clinlens.batch.discover import STOW_FAILED, Discovery, ErrorRecord, Selection, discover
from clinlens.batch.outputs import atomic_write_json, atomic_write_text
from clinlens.batch.process import DONE, BatchConfig, base_row, is_complete, series_dir

SUMMARY_COLUMNS = ["study_uid", "series_uid", "modality", "patient_id", "description", "source", "slices", "status",
                   "kind", "reason", "stage", "family", "top_class", "top_probability", "top_concept", "segments",
                   "heatmaps", "stowed", "seconds", "out_dir"]
STOWED = "stowed.json"


@dataclass
class BatchResult:
    rows: list = field(default_factory=list)
    errors: list = field(default_factory=list)     # ErrorRecord
    counts: dict = field(default_factory=dict)
    out_dir: str = ""
    seconds: float = 0.0

    @property
    def exit_code(self) -> int:
        return 1 if self.errors else 0

    def by_status(self, status: str) -> list:
        return [r for r in self.rows if r.get("status") == status]


def validate_prompts(prompts) -> None:
    """Refuse negated or empty segmentation prompts before any work starts (ValueError)."""
    from clinlens.text.negation import NEGATED, parse_prompt

    for p in prompts:
        finding, polarity = parse_prompt(p)  # raises ValueError for empty / mixed prompts
        if polarity == NEGATED:
            raise ValueError(f"'{p}' is negated: there is no region to segment; ask for '{finding}'")


def load_prompts_file(path) -> list[str]:
    """Prompts from a JSON file: a list of strings, or {"prompts": [...]}."""
    data = json.loads(Path(path).read_text())
    if isinstance(data, dict):
        data = data.get("prompts")
    if not isinstance(data, list) or not all(isinstance(p, str) and p.strip() for p in data):
        raise ValueError(f"{path}: want a JSON list of prompt strings (or {{\"prompts\": [...]}})")
    return [p.strip() for p in data]


# ----------------------------------------------------------------------------- STOW
def output_datasets(folder) -> list[Path]:
    """The DICOM outputs of a finished series (SEG, heatmaps, SR)."""
    folder = Path(folder)
    try:
        names = json.loads((folder / DONE).read_text())["outputs"]
    except (OSError, ValueError, KeyError):
        return []
    return [folder / n for n in sorted(names) if n.endswith(".dcm")]


def stow_series(folder, url: str, client=None) -> dict:
    """STOW-RS a finished series' DICOM outputs to `url`; records ``stowed.json`` (resume skips it later)."""
    import pydicom
    from dicomweb_client import DICOMwebClient

    folder = Path(folder)
    files = output_datasets(folder)
    if not files:
        return {"stowed": 0}
    marker = folder / STOWED
    done = json.loads((folder / DONE).read_text())
    try:
        prev = json.loads(marker.read_text())
        if prev.get("url") == url and prev.get("fingerprint") == done.get("fingerprint"):
            return {"stowed": 0, "already": len(prev.get("instances", []))}
    except (OSError, ValueError):
        pass
    client = client or DICOMwebClient(url=url)
    datasets = [pydicom.dcmread(str(f)) for f in files]
    client.store_instances(datasets)
    atomic_write_json(marker, {"url": url, "fingerprint": done.get("fingerprint"),
                               "instances": [str(d.SOPInstanceUID) for d in datasets],
                               "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
    return {"stowed": len(datasets)}


# ----------------------------------------------------------------------------- reports
def _csv_text(rows) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=SUMMARY_COLUMNS, extrasaction="ignore")
    w.writeheader()
    for r in sorted(rows, key=lambda r: (r.get("study_uid", ""), r.get("series_uid", ""))):
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in SUMMARY_COLUMNS})
    return buf.getvalue()


def write_reports(out_dir, result: BatchResult, source: str, config: BatchConfig, executor_info: dict,
                  disc: Discovery) -> None:
    out = Path(out_dir)
    atomic_write_text(out / "summary.csv", _csv_text(result.rows))
    atomic_write_json(out / "errors.json", {"source": str(source), "failed": len(result.errors),
                                            "errors": [e.to_dict() for e in result.errors]})
    atomic_write_json(out / "batch.json", {
        "source": str(source), "counts": result.counts, "seconds": result.seconds, "executor": executor_info,
        "files_scanned": disc.files, "skipped_non_image": disc.skipped, "exit_code": result.exit_code,
        "config": {**asdict(config), "fingerprint": config.fingerprint()}})


# ----------------------------------------------------------------------------- the batch
def run_batch(source, out_dir, config: BatchConfig | None = None, selection: Selection | None = None,
              executor: str = "local", workers: int = 2, address: str | None = None, threads: int | None = None,
              stow: bool = False, stow_url: str | None = None, progress: bool = True) -> BatchResult:
    """Run a batch end to end; returns the rows, the error records and the counts (see `exit_code`)."""
    from tqdm.auto import tqdm

    from clinlens.batch.executors import make_executor

    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = config or BatchConfig(out_dir=str(out))
    if Path(config.out_dir).resolve() != out.resolve():
        raise ValueError(f"config.out_dir {config.out_dir} is not the output folder {out}")
    if "segment" in config.tasks:
        validate_prompts(config.segment_prompts)
    is_web = str(source).startswith(("http://", "https://"))
    target = (stow_url or (str(source).rstrip("/") if is_web else None)) if stow else None
    if stow and not target:
        raise ValueError("--stow needs a DICOMweb source or --stow-url")
    disc = discover(source, selection, exclude=[out])
    result = BatchResult(out_dir=str(out), errors=list(disc.errors))
    # a series that failed validation is a row too, so the CSV covers the whole batch
    for e in disc.errors:
        if e.series_uid and e.stage == "validate":
            row = base_row(_spec_stub(e))
            row.update(status="failed", kind=e.kind, reason=e.reason, stage=e.stage)
            result.rows.append(row)
    fp = config.fingerprint()
    todo = []
    for spec in disc.specs:
        folder = series_dir(out, spec)
        if is_complete(folder, fp):
            row = base_row(spec)
            row.update(status="skipped", reason="outputs complete (resume)", out_dir=str(folder),
                       **_summary_from_result(folder))
            result.rows.append(row)
        else:
            todo.append(spec)
    ex = make_executor(executor, config, workers, address, threads)
    bar = tqdm(total=len(disc.specs), initial=len(disc.specs) - len(todo), unit="series", desc="clinlens batch",
               disable=not progress, dynamic_ncols=True, smoothing=0.1)
    seen = set()
    try:
        for row in ex.map(todo):
            seen.add(row.get("series_uid"))
            result.rows.append(row)
            if row.get("status") == "failed":
                result.errors.append(ErrorRecord(row.get("kind", ""), row.get("reason", ""), row.get("series_uid", ""),
                                                 row.get("study_uid", ""), stage=row.get("stage") or "process"))
            bar.update(1)
            bar.set_postfix(failed=sum(r.get("status") == "failed" for r in result.rows), refresh=False)
    finally:
        bar.close()
    for spec in todo:   # a series the executor lost without a row (should not happen) still counts
        if spec.series_uid not in seen:
            row = base_row(spec)
            row.update(status="failed", kind="processing_failed", reason="no result from the executor", stage="process")
            result.rows.append(row)
            result.errors.append(ErrorRecord(row["kind"], row["reason"], spec.series_uid, spec.study_uid,
                                             stage="process"))
    if target:
        for row in result.rows:
            if row.get("status") in ("ok", "skipped"):
                try:
                    info = stow_series(row["out_dir"], target)
                    row["stowed"] = info.get("stowed", 0) + info.get("already", 0)
                except Exception as e:  # noqa: BLE001 (server down, rejected instance)
                    row["stowed"] = 0
                    result.errors.append(ErrorRecord(STOW_FAILED, f"STOW to {target} failed: {e}"[:500],
                                                     row["series_uid"], row.get("study_uid", ""), stage="stow"))
    result.rows = [r for r in result.rows if r.get("series_uid") or r.get("status") != "failed"]
    try:
        (out / ".staging").rmdir()   # only when empty (a kept staging folder stays)
    except OSError:
        pass
    result.seconds = round(time.perf_counter() - t0, 3)
    result.counts = {s: len(result.by_status(s)) for s in ("ok", "skipped", "failed")}
    result.counts.update(series=len(result.rows), errors=len(result.errors), files_scanned=disc.files,
                         skipped_non_image=disc.skipped)
    write_reports(out, result, source, config, ex.describe(), disc)
    return result


def _spec_stub(e: ErrorRecord):
    from clinlens.batch.discover import SeriesSpec

    return SeriesSpec(series_uid=e.series_uid, study_uid=e.study_uid, modality=e.modality)


def _summary_from_result(folder) -> dict:
    """The CSV fields of a series finished by an earlier run (from its result.json)."""
    try:
        doc = json.loads((Path(folder) / "result.json").read_text())
    except (OSError, ValueError):
        return {}
    s, cls = doc.get("series", {}), doc.get("classification")
    segs = [f for f in doc.get("segmentation") or [] if f.get("segment_number")]
    return {"modality": s.get("modality", ""), "patient_id": s.get("patient_id", ""), "slices": s.get("slices", 0),
            "description": s.get("description", ""),
            "family": cls.get("family", "") if cls else "",
            "top_class": cls["classes"][0]["class"] if cls else "",
            "top_probability": cls["classes"][0]["probability"] if cls else None,
            "top_concept": cls["concepts"][0]["concept"] if cls else "",
            "segments": "; ".join(f"{f['prompt']}:{f['score']:.2f}" for f in segs),
            "heatmaps": len(doc.get("explanations") or [])}
