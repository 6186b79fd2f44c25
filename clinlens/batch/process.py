"""The pure per-series function of a batch: one series in, its outputs on disk and one result row out.

``process_series(spec, config, models=None) -> dict`` is what every executor runs (in-process, in a
process-pool worker, in a Ray actor). It

1. skips the series when its outputs are complete for this configuration (``done.json``; resume);
2. stages the series: a folder of links to its files, or its instances fetched over DICOMweb;
3. validates headers (`clinlens.batch.discover.validate_headers`) and loads the volume once
   (`clinlens.data.dicom_io.read_series`), in the SimpleITK/GDCM slice order the SEG uses;
4. runs the tasks on that one volume: text-prompted segmentation (the app's `TextSegInfer`, so batch
   and click give the same mask), CSR concept classification (every slice, the key slice reported),
   Grad-ECLIP/MedGrad heatmaps (`explain_volume`);
5. writes SEG, parametric-map heatmaps, a TID 1500 SR and ``result.json`` atomically, each derived
   object checked against the source geometry, then ``done.json`` last;
6. returns a row (status ``ok`` | ``skipped`` | ``failed``, with the error kind and reason). It never
   raises for a bad series: a failure is a row, so one series cannot stop a batch.

Models are loaded once per process (`get_models`) and reused for every series it handles.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clinlens.batch.discover import (EMPTY_SERIES, FETCH_FAILED, INCONSISTENT_GEOMETRY, PROCESSING_FAILED,
                                     ErrorRecord, SeriesError, SeriesSpec, inspect_file, validate_headers)

TASKS = ("segment", "classify", "explain")
DONE = "done.json"
RESULT = "result.json"


@dataclass(frozen=True)
class BatchConfig:
    """Everything that decides a series' outputs (its `fingerprint` keys resume), plus where they go."""

    out_dir: str
    tasks: tuple = TASKS
    prompts: tuple = ()                 # text prompts for "segment" (default: the CT findings)
    threshold: float = 0.5              # text-match probability a region must reach
    explain_targets: tuple = ()         # default: the prompts, else the top class
    explain_method: str = "medgrad"
    explain_blocks: str | None = None   # "all", "last" (the paper's block) or a number of last vision blocks
    explain_gradient: str | None = None  # (E3) "direct" (residual path) or "exact" (a backward through the blocks)
    clip_dir: str | None = None         # a local HF CLIP dir (default: the configured / shipped one)
    model_dir: str | None = None        # published region / CSR models (else the ones beside the CLIP)
    device: str | None = None           # None: CUDA when available
    threads: int = 1                    # torch threads per worker
    keep_staging: bool = False

    def __post_init__(self):
        bad = [t for t in self.tasks if t not in TASKS]
        if bad or not self.tasks:
            raise ValueError(f"unknown task(s) {bad}; choose from {TASKS}")
        from clinlens.explain.grad_eclip import BLOCK_METHODS, GRADIENTS

        blocks, gradient = self.explain_choice
        if gradient not in GRADIENTS:
            raise ValueError(f"explain gradient must be one of {', '.join(GRADIENTS)}, got {gradient!r}")
        b = str(blocks)
        if b not in ("last", "all") and not (b.isdigit() and int(b) >= 1):
            raise ValueError(f"explain blocks must be 'last', 'all' or a number of last blocks >= 1, got {b!r}")
        if self.explain_method not in BLOCK_METHODS and (b not in ("last", "1") or gradient != "exact"):
            raise ValueError(f"explain method {self.explain_method!r} has the last block and the exact gradient only; "
                             f"blocks {b!r} and gradient {gradient!r} apply to {' and '.join(BLOCK_METHODS)}")
        if b.isdigit() and "explain" in self.tasks:  # refused here, not once per series
            from clinlens.models.clip import resolve_clip_dir, vision_depth

            clip = Path(self.clip_dir) if self.clip_dir else resolve_clip_dir()
            depth = vision_depth(clip)
            if int(b) > depth:
                raise ValueError(f"explain blocks {b} exceeds the {depth} vision blocks of the CLIP in {clip}; "
                                 f"ask 'all' or a number up to {depth}")

    @property
    def explain_choice(self) -> tuple[str, str]:
        """(blocks, gradient): the ones given, else the method's (`clinlens.infer.explain.method_defaults`)."""
        from clinlens.infer.explain import method_defaults

        blocks, gradient = method_defaults(self.explain_method)
        return self.explain_blocks or blocks, self.explain_gradient or gradient

    @property
    def blocks(self) -> str:
        return self.explain_choice[0]

    @property
    def gradient(self) -> str:
        return self.explain_choice[1]

    @property
    def segment_prompts(self) -> tuple:
        if self.prompts:
            return tuple(self.prompts)
        from clinlens.data.phantoms import CT_FINDINGS

        return tuple(CT_FINDINGS)

    def model_files(self) -> dict:
        """The weight files the outputs depend on, with mtimes (part of the fingerprint)."""
        from clinlens.models.clip import resolve_clip_dir

        clip = Path(self.clip_dir) if self.clip_dir else resolve_clip_dir()
        files = {}
        for p in sorted(clip.glob("*.safetensors")) + (sorted(Path(self.model_dir).glob("*.safetensors"))
                                                       if self.model_dir else []):
            files[str(p)] = p.stat().st_mtime
        return files

    def fingerprint(self) -> str:
        d = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("out_dir", "threads", "keep_staging",
                                                                           "device")}
        d["prompts"] = list(self.segment_prompts) if "segment" in self.tasks else []
        d["explain_blocks"], d["explain_gradient"] = self.blocks, self.gradient
        for key, before in (("explain_blocks", "last"), ("explain_gradient", "exact")):
            if d[key] == before:  # the values before the options: earlier runs stay complete
                del d[key]
        d["models"] = self.model_files()
        return hashlib.sha1(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- models, once per process
class Models:
    """The CLIP, the app's text-seg task (region model) and the CSR models, loaded lazily and kept."""

    def __init__(self, config: BatchConfig):
        from clinlens.data.phantoms import CHEST_FINDINGS, CT_FINDINGS, DERM_CONCEPTS, DERM_DIAGNOSES
        from clinlens.infer.concepts import LazyCSR
        from clinlens.infer.region import LazyRegion, TextSegInfer
        from clinlens.models.clip import LazyClip

        self.config = config
        conf = {"clip_model": str(config.clip_dir)} if config.clip_dir else None
        self.clip = LazyClip(conf, device=config.device)
        model_dir = Path(config.model_dir) if config.model_dir else self.clip.path
        self.region = LazyRegion(self.clip, model_dir / "region.safetensors")
        self.csr = LazyCSR(self.clip, model_dir)
        vocab = {"chest": CHEST_FINDINGS, "derm": DERM_CONCEPTS + DERM_DIAGNOSES, "ct": CT_FINDINGS}
        self.text_seg = TextSegInfer(self.region, vocab, {})

    def warm(self) -> "Models":
        """Load what the configured tasks need now (a worker pays this once, before its first series)."""
        self.clip.get()
        if "segment" in self.config.tasks:
            self.region.get()
        if "classify" in self.config.tasks:
            self.csr.get("ct")
        return self

    @property
    def device(self) -> str:
        return str(self.clip.get().device)


_MODELS: dict = {}


def get_models(config: BatchConfig) -> Models:
    """This process's `Models` for the config's model files and device (loaded on first use)."""
    key = (config.clip_dir, config.model_dir, config.device)
    if key not in _MODELS:
        _MODELS[key] = Models(config)
    m = _MODELS[key]
    m.config = config
    return m


def model_loads() -> int:
    """How many model sets this process has loaded (a worker should report 1, whatever it ran)."""
    return len(_MODELS)


# ----------------------------------------------------------------------------- paths, resume
def series_dir(out_dir, spec: SeriesSpec) -> Path:
    return Path(out_dir) / (spec.study_uid or "unknown-study") / spec.series_uid


def is_complete(folder, fingerprint: str) -> bool:
    """True when `done.json` says the outputs were written for this fingerprint and they are all there."""
    p = Path(folder) / DONE
    try:
        done = json.loads(p.read_text())
    except (OSError, ValueError):
        return False
    if done.get("fingerprint") != fingerprint:
        return False
    for name, size in done.get("outputs", {}).items():
        f = Path(folder) / name
        if not f.is_file() or f.stat().st_size != size:
            return False
    return True


def base_row(spec: SeriesSpec) -> dict:
    return {"series_uid": spec.series_uid, "study_uid": spec.study_uid, "modality": spec.modality,
            "patient_id": spec.patient_id, "description": spec.description, "source": spec.source,
            "status": "", "kind": "", "reason": "", "stage": "", "slices": 0, "family": "",
            "top_class": "", "top_probability": None, "top_concept": "", "segments": "", "heatmaps": 0,
            "outputs": [], "seconds": 0.0, "out_dir": ""}


# ----------------------------------------------------------------------------- staging
def _stage(spec: SeriesSpec, root: Path) -> Path:
    """A folder holding exactly this series' instances: links to its files, or fetched over DICOMweb."""
    d = root / f"{spec.series_uid}.{os.getpid()}"
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    if spec.url:
        from dicomweb_client import DICOMwebClient

        try:
            instances = DICOMwebClient(url=spec.url).retrieve_series(spec.study_uid, spec.series_uid)
        except Exception as e:  # noqa: BLE001 (HTTP errors, timeouts, bad multipart)
            raise SeriesError(FETCH_FAILED, f"could not retrieve the series from {spec.url}: {e}"[:300]) from e
        if not instances:
            raise SeriesError(EMPTY_SERIES, f"empty series: the server returned no instances from {spec.url}")
        for k, ds in enumerate(instances):
            ds.save_as(d / f"{k:05d}.dcm", write_like_original=False)
        return d
    if not spec.files:
        raise SeriesError(EMPTY_SERIES, "empty series: no instance files")
    for k, f in enumerate(spec.files):
        src = Path(f).resolve()
        link = d / f"{k:05d}_{src.name}"
        try:
            os.symlink(src, link)
        except OSError:
            shutil.copy2(src, link)
    return d


def _load(stage: Path):
    """(volume [z, y, x] in GDCM order, geometry, ordered source headers, ordered file paths)."""
    import pydicom

    from clinlens.data.dicom_io import read_series
    from clinlens.data.dicom_seg import sorted_series_files

    infos = []
    for p in sorted(stage.iterdir()):
        r = inspect_file(p)
        if isinstance(r, ErrorRecord):
            raise SeriesError(r.kind, f"{Path(p).name}: {r.reason}", [str(p)])
        if r is not None:
            infos.append(r)
    if not infos:
        raise SeriesError(EMPTY_SERIES, "empty series: no image instances")
    validate_headers(infos)
    try:
        vol, geom = read_series(stage)
    except ValueError as e:
        raise SeriesError(INCONSISTENT_GEOMETRY, str(e)) from e
    except (NotImplementedError, RuntimeError) as e:   # pixel data that no handler decodes after all
        raise SeriesError("unsupported_transfer_syntax", f"pixel data cannot be decoded: {e}"[:300]) from e
    gdcm = [str(Path(f)) for f in sorted_series_files(stage)]
    loaded = [str(Path(f)) for f in geom["files"]]
    if sorted(gdcm) != sorted(loaded):
        raise SeriesError(INCONSISTENT_GEOMETRY, f"GDCM sees {len(gdcm)} slices, pydicom {len(loaded)}")
    perm = [loaded.index(f) for f in gdcm]
    vol = vol[perm]
    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in gdcm]
    return vol, geom, sources, gdcm


# ----------------------------------------------------------------------------- tasks
def _loaded_image(vol, geom, stage):
    from clinlens.data.dicom_io import to_sitk
    from clinlens.data.image_io import LoadedImage

    return LoadedImage(array=vol, ref=to_sitk(vol, geom), path=str(stage), is_rgb=False,
                       modality=geom.get("modality", ""))


def run_segment(models: Models, image, key: str, prompts, threshold: float) -> tuple[np.ndarray | None, list]:
    """Each prompt through the app's text-seg task; a labelmap (prompt i -> value i+1, earlier prompts
    keep overlapping voxels) and one record per prompt."""
    label = np.zeros(image.spatial_shape, np.uint8)
    found = []
    for i, prompt in enumerate(prompts, 1):
        t0 = time.perf_counter()
        mask, res = models.text_seg.run({"image": key, "prompt": prompt, "threshold": threshold}, image)
        m = (np.asarray(mask) > 0) & (label == 0)
        label[m] = i
        found.append({"prompt": prompt, "value": i, "found": bool(res["found"]) and bool(m.any()),
                      "score": float(res["score"]), "slice": res["slice"], "voxels": int(m.sum()),
                      "what_is_here": res.get("what_is_here"), "seconds": round(time.perf_counter() - t0, 3)})
    return (label if label.any() else None), found


def run_classify(models: Models, vol: np.ndarray, family: str, batch: int = 8) -> dict:
    """CSR on every slice; the key slice is the one with the strongest concept evidence. Class
    probabilities are the key slice's; concept scores are the max over slices (with their slice)."""
    from clinlens.infer.concepts import csr_over_slices

    model = models.csr.get(family)
    probs, cscores = csr_over_slices(model, models.clip.get(), vol, batch)
    key = int(np.argmax(cscores.max(1)))
    order = np.argsort(-probs[key])
    classes = [{"class": model.classes[i], "probability": round(float(probs[key, i]), 4)} for i in order]
    concepts = sorted(({"concept": c, "score": round(float(cscores[:, j].max()), 4),
                        "slice": int(np.argmax(cscores[:, j]))} for j, c in enumerate(model.concepts)),
                      key=lambda d: -d["score"])
    return {"family": family, "key_slice": key, "classes": classes, "concepts": concepts,
            "slice_top_class": [model.classes[int(i)] for i in probs.argmax(1)]}


def run_explain(models: Models, vol: np.ndarray, target: str, method: str, blocks: str, gradient: str
                ) -> tuple[np.ndarray, dict]:
    from clinlens.data.image_io import to_unit_rgb
    from clinlens.explain.grad_eclip import explain_volume
    from clinlens.infer.explain import blocks_option, top_regions

    bundle = models.clip.get()
    n = blocks_option({"blocks": blocks}, len(bundle.model.vision_model.encoder.layers))
    r = explain_volume(bundle, lambda z: to_unit_rgb(vol[z]), vol.shape[0], target_text=target, method=method,
                       blocks=n, gradient=gradient)
    heat = np.asarray(r["upsampled"], np.float32)
    return heat, {"target": target, "explained": r.get("target") or target, "negated": bool(r.get("negated")),
                  "method": method, "blocks": n, "gradient": gradient, "scale": float(r["scale"]),
                  "top_regions": top_regions(heat)}


# ----------------------------------------------------------------------------- the per-series function
def process_series(spec: SeriesSpec, config: BatchConfig, models: Models | None = None) -> dict:
    """Run the configured tasks on one series and write its outputs; returns its result row (never raises)."""
    t0, started, cpu0 = time.perf_counter(), time.time(), time.process_time()
    row = base_row(spec)
    out = series_dir(config.out_dir, spec)
    row["out_dir"] = str(out)
    fp = config.fingerprint()
    if is_complete(out, fp):
        row.update(status="skipped", reason="outputs complete (resume)", outputs=sorted(
            json.loads((out / DONE).read_text()).get("outputs", {})))
        return row
    stage = None
    try:
        stage = _stage(spec, Path(config.out_dir) / ".staging")
        row["stage"] = "validate"
        vol, geom, sources, files = _load(stage)
        row["stage"] = "process"
        row.update(_run_and_write(spec, config, models or get_models(config), vol, geom, sources, stage, out, fp))
        row.update(status="ok", stage="")
    except SeriesError as e:
        row.update(status="failed", kind=e.kind, reason=e.reason, stage=row["stage"] or "validate")
    except Exception as e:  # noqa: BLE001 (a failing series is a row, the batch goes on)
        tb = traceback.format_exc(limit=3).strip().splitlines()
        where = next((ln.strip() for ln in reversed(tb) if ln.strip().startswith("File")), "")
        row.update(status="failed", kind=PROCESSING_FAILED, reason=f"{type(e).__name__}: {e} [{where}]"[:500],
                   stage=row["stage"] or "process")
    finally:
        if stage is not None and not config.keep_staging:
            shutil.rmtree(stage, ignore_errors=True)
    row["seconds"] = round(time.perf_counter() - t0, 3)
    row["started"], row["finished"] = round(started, 3), round(time.time(), 3)   # wall clock (throughput)
    row["cpu_seconds"] = round(time.process_time() - cpu0, 3)                     # this worker's CPU time
    row["pid"], row["model_loads"] = os.getpid(), model_loads()
    return row


def _run_and_write(spec, config, models, vol, geom, sources, stage, out: Path, fp: str) -> dict:
    from clinlens.batch import outputs as O
    from clinlens.data.dicom_io import derived_uid

    seed = f"{spec.series_uid}/{fp}"    # deterministic output UIDs: a rerun (or a re-STOW) is idempotent
    from clinlens.infer.base import family_of

    depth = int(vol.shape[0])
    image = _loaded_image(vol, geom, stage)
    family = family_of(image)  # the server's rule: a one-frame radiograph is chest, a CT series ct
    timings, files, result = {}, {}, {}
    sx, sy, sz = (float(s) for s in geom["spacing"])

    seg = None
    segments = []
    if "segment" in config.tasks:
        t = time.perf_counter()
        label, found = run_segment(models, image, spec.series_uid, config.segment_prompts, config.threshold)
        timings["segment_s"] = round(time.perf_counter() - t, 3)
        if label is not None:
            values = sorted(int(v) for v in np.unique(label) if v > 0)
            names = {f["value"]: f["prompt"] for f in found}
            seg = O.seg_dataset(stage, label, names, sources, seed)
            for f in found:
                if f["value"] in values:
                    f["segment_number"] = values.index(f["value"]) + 1
                    f["volume_mm3"] = round(f["voxels"] * sx * sy * sz, 3)
                    segments.append(f)
            O.atomic_save_dataset(seg, out / "seg.dcm")
            files["seg.dcm"] = {"sop_instance_uid": str(seg.SOPInstanceUID), "series_instance_uid":
                                str(seg.SeriesInstanceUID), "frames": int(seg.NumberOfFrames)}
        result["segmentation"] = found

    cls = None
    if "classify" in config.tasks:
        t = time.perf_counter()
        cls = run_classify(models, vol, family)
        cls["key_slice_sop_instance_uid"] = str(sources[cls["key_slice"]].SOPInstanceUID)
        timings["classify_s"] = round(time.perf_counter() - t, 3)
        result["classification"] = cls

    if "explain" in config.tasks:
        targets = list(config.explain_targets) or (list(config.segment_prompts) if "segment" in config.tasks else [])
        if not targets:
            targets = [cls["classes"][0]["class"]] if cls else ["lung nodule"]
        t = time.perf_counter()
        result["explanations"] = []
        for i, target in enumerate(targets):
            heat, info = run_explain(models, vol, target, config.explain_method, config.blocks, config.gradient)
            dsets = O.heatmap_datasets(sources, heat, target, config.explain_method, seed, index=i)
            names = []
            for k, ds in enumerate(dsets):
                name = f"heatmap_{i:02d}.dcm" if len(dsets) == 1 else f"heatmap_{i:02d}_{k:04d}.dcm"
                O.atomic_save_dataset(ds, out / name)
                files[name] = {"sop_instance_uid": str(ds.SOPInstanceUID), "series_instance_uid":
                               str(ds.SeriesInstanceUID), "sop_class_uid": str(ds.SOPClassUID),
                               "frames": int(ds.get("NumberOfFrames", 1)), "target": target}
                names.append(name)
            result["explanations"].append({**info, "files": names})
        timings["explain_s"] = round(time.perf_counter() - t, 3)

    if cls is not None or segments:
        sr = O.sr_dataset(sources, seed, cls, seg, segments, slice_spacing=sz if depth > 1 else None)
        O.check_sr(sr, sources, seg if segments else None)
        O.atomic_save_dataset(sr, out / "sr.dcm")
        files["sr.dcm"] = {"sop_instance_uid": str(sr.SOPInstanceUID), "series_instance_uid": str(sr.SeriesInstanceUID)}

    doc = {
        "series": {"series_uid": spec.series_uid, "study_uid": spec.study_uid, "modality": spec.modality,
                   "patient_id": spec.patient_id, "description": spec.description, "source": spec.source,
                   "slices": depth, "shape_zyx": list(vol.shape), "spacing_xyz": [sx, sy, sz],
                   "origin_xyz": list(geom["origin"]), "direction": list(geom["direction"]),
                   "frame_of_reference_uid": geom.get("frame_of_reference_uid", ""),
                   "sop_instance_uids": [str(s.SOPInstanceUID) for s in sources]},
        "config": {"tasks": list(config.tasks), "threshold": config.threshold, "explain_method": config.explain_method,
                   "explain_blocks": config.blocks, "explain_gradient": config.gradient,
                   "fingerprint": fp, "device": models.device},
        "outputs": files, "timings": timings, **result,
    }
    O.atomic_write_json(out / RESULT, doc)
    manifest = {name: (out / name).stat().st_size for name in [*files, RESULT]}
    O.atomic_write_json(out / DONE, {"fingerprint": fp, "series_uid": spec.series_uid, "outputs": manifest,
                                     "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                     "output_uids": {k: v["sop_instance_uid"] for k, v in files.items()},
                                     "uid_seed": derived_uid(seed, "check")})
    top = cls["classes"][0] if cls else None
    return {"slices": depth, "family": family, "top_class": top["class"] if top else "",
            "top_probability": top["probability"] if top else None,
            "top_concept": cls["concepts"][0]["concept"] if cls else "",
            "segments": "; ".join(f"{s['prompt']}:{s['score']:.2f}" for s in segments),
            "heatmaps": len(result.get("explanations", [])), "outputs": sorted(manifest)}
