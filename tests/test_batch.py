"""`clinlens batch` on real parts: pydicom's real DICOMDIR test set (CT, MR, CR series, header-only CT,
localizers, a gapped CT), generated phantom CT series, injected faults (truncated files, a missing
slice, uneven spacing, a damaged file, an undecodable transfer syntax), a real Orthanc as DICOMweb
source and STOW target, and a local Ray cluster with 2 worker actors. Every output is read back with
pydicom and highdicom and checked against its source series."""
import csv
import json
import os
import shutil
import time
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from clinlens.batch import discover as D
from clinlens.batch.discover import Selection, scan_folder, validate_headers
from clinlens.batch.executors import gpu_share
from clinlens.batch.outputs import atomic_write_bytes, check_derived
from clinlens.batch.process import DONE, BatchConfig, series_dir
from clinlens.batch.run import run_batch
from clinlens.data.dicom_io import write_ct_series
from clinlens.data.dicom_seg import read_seg, sorted_series_files
from clinlens.data.phantoms import make_ct
from clinlens.orthanc import Orthanc, orthanc_available

TEST_FILES = Path(pydicom.data.__file__).parent / "test_files"
DICOMDIRTESTS = TEST_FILES / "dicomdirtests"
CT5N = DICOMDIRTESTS / "98892001" / "CT5N"
CT5N_UID = "1.3.6.1.4.1.5962.1.1.0.0.0.1194734704.16302.0.6"
CT2_GAPPED_UID = "1.3.6.1.4.1.5962.1.1.0.0.0.1196530851.28319.0.2"     # real CT with a 202 mm gap
CT2N_LOCALIZER_UID = "1.3.6.1.4.1.5962.1.1.0.0.0.1194734704.16302.0.2"  # two planes in one series
TINY_ALPHA_UID = "1.2.826.0.1.3680043.8.498.73052100648462801855733330064330327590"  # headers only
STUDY = "1.2.826.0.1.3680043.8.498.9999.1"
PHANTOMS = {f"1.2.826.0.1.3680043.8.498.9999.1.{i}": i for i in (1, 2)}
BAD = {"missing": "1.2.826.0.1.3680043.8.498.9999.1.10", "truncated": "1.2.826.0.1.3680043.8.498.9999.1.11",
       "spacing": "1.2.826.0.1.3680043.8.498.9999.1.12"}
PROMPT = "lung nodule"


def _phantom(folder, uid, seed, shape=(10, 64, 64)):
    s = make_ct(seed, shape=shape, findings=["lung nodule"])
    return write_ct_series(s, folder, study_uid=STUDY, series_uid=uid, series_number=seed,
                           series_description=f"phantom {seed}")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A folder with everything a real archive export has, nested several levels deep."""
    root = tmp_path_factory.mktemp("batch_in")
    shutil.copytree(DICOMDIRTESTS, root / "pydicom" / "dicomdirtests")
    for uid, seed in PHANTOMS.items():
        _phantom(root / "site" / "patient" / f"series{seed}", uid, seed)
    files = _phantom(root / "site" / "faults" / "missing", BAD["missing"], 10)
    files[4].unlink()                                               # a missing slice in the middle
    files = _phantom(root / "site" / "faults" / "truncated", BAD["truncated"], 11)
    data = files[3].read_bytes()
    files[3].write_bytes(data[: int(len(data) * 0.7)])              # cut inside the pixel data
    files = _phantom(root / "site" / "faults" / "spacing", BAD["spacing"], 12)
    ds = pydicom.dcmread(files[5])
    ipp = [float(v) for v in ds.ImagePositionPatient]
    ds.ImagePositionPatient = [ipp[0], ipp[1], ipp[2] + 0.4 * float(ds.SliceThickness)]  # uneven, no gap
    ds.save_as(files[5])
    other = root / "other"
    other.mkdir()
    shutil.copy(TEST_FILES / "MR_small_jpeg_ls_lossless.dcm", other / "jpegls.dcm")  # no JPEG-LS decoder here
    shutil.copy(TEST_FILES / "MR_truncated.dcm", other / "mr_truncated.dcm")       # real truncated file
    shutil.copy(TEST_FILES / "test-SR.dcm", other / "report.dcm")                  # non-image: skipped
    (other / "damaged.dcm").write_bytes(b"\0" * 128 + b"DICM" + os.urandom(300))   # DICM prefix, garbage
    (other / "notes.txt").write_text("not DICOM")
    return root


def _errors_by_series(errors):
    out = {}
    for e in errors:
        out.setdefault(e["series_uid"] if isinstance(e, dict) else e.series_uid, []).append(
            e["kind"] if isinstance(e, dict) else e.kind)
    return out


# ----------------------------------------------------------------------------- discovery
def test_scan_groups_series_and_names_every_fault(inputs):
    d = scan_folder(inputs)
    specs = {s.series_uid: s for s in d.specs}
    assert CT5N_UID in specs and set(PHANTOMS) <= set(specs)
    assert specs[CT5N_UID].n_instances == 5 and specs[CT5N_UID].modality == "CT"
    # slice order is along the normal (CT5N's files are named against z)
    z = [float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]) for f in specs[CT5N_UID].files]
    assert z == sorted(z)
    errs = _errors_by_series(d.errors)
    assert D.MISSING_SLICES in errs[BAD["missing"]]
    assert D.TRUNCATED in errs[BAD["truncated"]]
    assert D.INCONSISTENT_SPACING in errs[BAD["spacing"]]
    assert D.MISSING_SLICES in errs[CT2_GAPPED_UID]
    assert D.INCONSISTENT_ORIENTATION in errs[CT2N_LOCALIZER_UID]
    assert D.EMPTY_SERIES in errs[TINY_ALPHA_UID]
    jpegls = pydicom.dcmread(TEST_FILES / "MR_small_jpeg_ls_lossless.dcm", stop_before_pixels=True).SeriesInstanceUID
    assert D.UNSUPPORTED_TS in errs[jpegls]
    by_file = {Path(e.file).name: e.kind for e in d.errors if e.file}
    assert by_file["damaged.dcm"] == D.CORRUPTED
    assert by_file["mr_truncated.dcm"] == D.TRUNCATED and by_file["slice_0003.dcm"] == D.TRUNCATED
    assert "report.dcm" not in by_file and "notes.txt" not in by_file  # SR and text: skipped, not errors
    assert not set(errs) & set(specs)                                  # a failed series is never dispatched
    assert d.skipped >= 9                                              # DICOMDIRs, READMEs, SR, notes


def test_selection_by_study_series_modality_and_list_file(inputs, tmp_path):
    only_ct = scan_folder(inputs, Selection.build(modalities=["ct"]))
    assert {s.modality for s in only_ct.specs} == {"CT"}
    assert {s.series_uid for s in scan_folder(inputs, Selection.build(studies=[STUDY])).specs} == set(PHANTOMS)
    lst = tmp_path / "series.csv"
    lst.write_text("SeriesInstanceUID,note\n" + f"{CT5N_UID},real\n1.2.3.404,absent\n")
    d = scan_folder(inputs, Selection.build(series_file=lst))
    assert [s.series_uid for s in d.specs] == [CT5N_UID]
    assert [(e.kind, e.series_uid) for e in d.errors if e.kind == D.NOT_FOUND] == [(D.NOT_FOUND, "1.2.3.404")]
    txt = tmp_path / "series.txt"
    txt.write_text(f"# wanted\n{CT5N_UID}\n")
    assert [s.series_uid for s in scan_folder(inputs, Selection.build(series_file=txt)).specs] == [CT5N_UID]


def _info(z, iop=(1, 0, 0, 0, 1, 0), ps=(0.5, 0.5), size=(8, 8), pixels=True):
    return D.FileInfo(path=f"s{z}.dcm", series_uid="1.2", study_uid="1", modality="CT", sop_uid=f"1.2.{z}",
                      has_pixels=pixels, rows=size[0], columns=size[1], iop=iop, ipp=(0.0, 0.0, float(z)),
                      pixel_spacing=ps)


def test_validate_headers_rules():
    ok = validate_headers([_info(z) for z in (4, 0, 2, 6)])
    assert [i.ipp[2] for i in ok] == [0, 2, 4, 6]
    cases = {
        D.MISSING_SLICES: [_info(z) for z in (0, 2, 4, 8, 10)],
        D.INCONSISTENT_SPACING: [_info(z) for z in (0, 2, 3.2, 6, 8)],
        D.INCONSISTENT_ORIENTATION: [_info(0), _info(2, iop=(0, 1, 0, 0, 0, -1))],
        D.INCONSISTENT_GEOMETRY: [_info(0), _info(2, size=(8, 9))],
        D.EMPTY_SERIES: [_info(0, pixels=False), _info(2, pixels=False)],
    }
    for kind, infos in cases.items():
        with pytest.raises(D.SeriesError) as e:
            validate_headers(infos)
        assert e.value.kind == kind, (kind, e.value.reason)
    with pytest.raises(D.SeriesError, match="share slice position"):
        validate_headers([_info(0), _info(0), _info(2)])


def test_atomic_write_leaves_old_file_or_new_never_half(tmp_path):
    p = tmp_path / "x.json"
    atomic_write_bytes(p, b"old")

    class Boom(Exception):
        pass

    def failing(f):
        f.write(b"half")
        raise Boom()

    from clinlens.batch.outputs import _atomic

    with pytest.raises(Boom):
        _atomic(p, failing)
    assert p.read_bytes() == b"old" and [q.name for q in tmp_path.iterdir()] == ["x.json"]


def test_gpu_share():
    assert gpu_share(0, 2) == 0 and gpu_share(1, 2) == 0.5 and gpu_share(4, 2) == 1.0


# ----------------------------------------------------------------------------- output checks
def _source_datasets(spec_files):
    folder_files = [Path(f) for f in spec_files]
    return {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID): pydicom.dcmread(f, stop_before_pixels=True)
            for f in folder_files}


def check_series_outputs(folder: Path, source_files, prompt=PROMPT):
    """Read every output back (pydicom + highdicom) and check it against the source series."""
    srcs = _source_datasets(source_files)
    s0 = next(iter(srcs.values()))
    res = json.loads((folder / "result.json").read_text())
    n = len(srcs)
    assert res["series"]["slices"] == n and set(res["series"]["sop_instance_uids"]) == set(srcs)
    ordered = [srcs[u] for u in res["series"]["sop_instance_uids"]]      # the volume's z order
    done = json.loads((folder / DONE).read_text())
    for name, size in done["outputs"].items():
        assert (folder / name).stat().st_size == size
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]

    # SEG
    seg_info = [f for f in res["segmentation"] if f.get("segment_number")]
    if seg_info:
        seg = hd.seg.segread(str(folder / "seg.dcm"))
        assert seg.Modality == "SEG"
        assert str(seg.ReferencedSeriesSequence[0].SeriesInstanceUID) == str(s0.SeriesInstanceUID)
        refd = {str(i.ReferencedSOPInstanceUID) for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
        assert refd == set(srcs)
        assert int(seg.NumberOfFrames) == n * len(seg.SegmentSequence)
        assert str(seg.FrameOfReferenceUID) == str(s0.FrameOfReferenceUID)
        check_derived(pydicom.dcmread(folder / "seg.dcm"), ordered)
        for fg in seg.PerFrameFunctionalGroupsSequence:   # each frame sits where its source slice is
            src = srcs[str(fg.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)]
            np.testing.assert_allclose([float(v) for v in fg.PlanePositionSequence[0].ImagePositionPatient],
                                       [float(v) for v in src.ImagePositionPatient], atol=1e-3)
        names = {seg.get_segment_description(k).segment_label: k for k in seg.segment_numbers}
        assert prompt in names
        arr = seg.get_pixels_by_source_instance(source_sop_instance_uids=list(res["series"]["sop_instance_uids"]),
                                                segment_numbers=[names[prompt]], ignore_spatial_locations=True)
        rec = next(f for f in seg_info if f["prompt"] == prompt)
        assert int(np.asarray(arr).sum()) == rec["voxels"] > 0
    # heatmap(s)
    for e in res["explanations"]:
        for name in e["files"]:
            pm = pydicom.dcmread(folder / name)
            assert pm.SOPClassUID == "1.2.840.10008.5.1.4.1.1.30"             # Parametric Map Storage
            assert int(pm.NumberOfFrames) == n and str(pm.FrameOfReferenceUID) == str(s0.FrameOfReferenceUID)
            check_derived(pm, ordered)
            heat = pm.pixel_array
            assert heat.shape == (n, int(s0.Rows), int(s0.Columns)) and heat.dtype == np.float32
            assert 0 <= heat.min() and 0 < heat.max() <= 1                   # one scale over the series
            if e["top_regions"]:                                             # the JSON describes these pixels
                assert np.isclose(max(r["peak"] for r in e["top_regions"]), heat.max(), atol=1e-4)
            rwv = pm.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
            assert rwv.LUTLabel == "heat" and e["target"] in rwv.LUTExplanation
    # SR (TID 1500)
    sr = hd.sr.srread(str(folder / "sr.dcm"))
    assert isinstance(sr, hd.sr.Comprehensive3DSR)
    ev = {}
    for st in [*sr.get("CurrentRequestedProcedureEvidenceSequence", []), *sr.get("PertinentOtherEvidenceSequence", [])]:
        for s in st.ReferencedSeriesSequence:
            ev.setdefault(str(s.SeriesInstanceUID), set()).update(str(i.ReferencedSOPInstanceUID)
                                                                  for i in s.ReferencedSOPSequence)
    assert ev[str(s0.SeriesInstanceUID)] == set(srcs)
    report = sr.content
    cls = res["classification"]
    (group,) = report.get_image_measurement_groups()
    (qe,) = group.get_qualitative_evaluations()
    assert qe.value.meaning == cls["classes"][0]["class"]
    probs = {m.name.meaning: m.value for m in group.get_measurements()}
    assert np.isclose(float(probs[f"probability {cls['classes'][0]['class']}"]), cls["classes"][0]["probability"])
    vol_groups = report.get_volumetric_roi_measurement_groups()
    assert len(vol_groups) == len(seg_info)
    if seg_info:
        seg_ds = pydicom.dcmread(folder / "seg.dcm", stop_before_pixels=True)
        seg_uid = str(seg_ds.SOPInstanceUID)
        assert seg_uid in ev.get(str(seg_ds.SeriesInstanceUID), set())             # the SEG is SR evidence
        assert vol_groups[0].referenced_segment[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == seg_uid
    return res


# ----------------------------------------------------------------------------- local process pool
@pytest.fixture(scope="module")
def local_run(inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("batch_out")
    cfg = BatchConfig(out_dir=str(out), prompts=(PROMPT,))
    t = time.perf_counter()
    result = run_batch(inputs, out, cfg, Selection.build(modalities=["CT"]), executor="local", workers=2,
                       progress=True)
    return out, cfg, result, time.perf_counter() - t


def test_local_pool_completes_the_good_series_and_reports_the_bad(local_run, inputs):
    out, cfg, result, _ = local_run
    assert result.exit_code == 1
    ok = {r["series_uid"] for r in result.by_status("ok")}
    assert ok == {CT5N_UID, *PHANTOMS}
    assert {r["model_loads"] for r in result.by_status("ok")} == {1}   # each worker loaded the models once
    report = json.loads((out / "errors.json").read_text())
    errs = _errors_by_series(report["errors"])
    for uid, kind in [(BAD["missing"], D.MISSING_SLICES), (BAD["truncated"], D.TRUNCATED),
                      (BAD["spacing"], D.INCONSISTENT_SPACING), (CT2_GAPPED_UID, D.MISSING_SLICES),
                      (CT2N_LOCALIZER_UID, D.INCONSISTENT_ORIENTATION), (TINY_ALPHA_UID, D.EMPTY_SERIES)]:
        assert kind in errs[uid], (uid, errs.get(uid))
    assert all(e["reason"] for e in report["errors"])
    files = {Path(e["file"]).name for e in report["errors"] if e["file"]}
    assert {"damaged.dcm", "slice_0003.dcm"} <= files
    with open(out / "summary.csv") as f:
        rows = {r["series_uid"]: r for r in csv.DictReader(f)}
    assert {u for u, r in rows.items() if r["status"] == "ok"} == ok
    assert rows[BAD["missing"]]["status"] == "failed" and rows[BAD["missing"]]["kind"] == D.MISSING_SLICES
    assert rows[CT5N_UID]["top_class"] and rows[CT5N_UID]["slices"] == "5"
    d = scan_folder(inputs, Selection.build(modalities=["CT"]))
    for spec in d.specs:
        res = check_series_outputs(series_dir(out, spec), spec.files)
        assert res["config"]["fingerprint"] == cfg.fingerprint()


def test_rerun_skips_complete_series_redoes_damaged_outputs(local_run, inputs):
    out, cfg, first, _ = local_run
    d = scan_folder(inputs, Selection.build(modalities=["CT"]))
    phantom = next(s for s in d.specs if s.series_uid in PHANTOMS)
    other = [s for s in d.specs if s.series_uid != phantom.series_uid]
    (series_dir(out, phantom) / "heatmap_00.dcm").unlink()                 # incomplete: must be redone
    stamps = {s.series_uid: (series_dir(out, s) / DONE).stat().st_mtime_ns for s in other}
    result = run_batch(inputs, out, cfg, Selection.build(modalities=["CT"]), executor="local", workers=0,
                       progress=False)
    status = {r["series_uid"]: r["status"] for r in result.rows}
    assert status[phantom.series_uid] == "ok"
    assert all(status[s.series_uid] == "skipped" for s in other)
    assert all((series_dir(out, s) / DONE).stat().st_mtime_ns == stamps[s.series_uid] for s in other)
    assert status[BAD["missing"]] == "failed" and result.exit_code == 1   # failures are retried, and fail again
    check_series_outputs(series_dir(out, phantom), phantom.files)
    # another prompt is another configuration: nothing counts as complete
    cfg2 = BatchConfig(out_dir=str(out), prompts=("lung mass",), tasks=("segment",))
    assert cfg2.fingerprint() != cfg.fingerprint()


def test_cli_exit_codes(inputs, tmp_path, capsys):
    import argparse

    from clinlens.batch.cli import add_parser

    parser = argparse.ArgumentParser(prog="clinlens")
    add_parser(parser.add_subparsers(dest="cmd"))

    def run(*argv):
        args = parser.parse_args(["batch", *argv])
        return args.fn(args)

    assert run(str(inputs), "-o", str(tmp_path / "o1"), "--prompt", "no lung nodule") == 2
    assert "negated" in capsys.readouterr().err
    assert run(str(tmp_path / "nowhere"), "-o", str(tmp_path / "o2")) == 2
    # a clean folder: exit 0, only segmentation, prompts from a JSON file. (In `inputs`, the damaged file
    # belongs to no known series, so any selection there reports it and exits 1.)
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"prompts": [PROMPT]}))
    code = run(str(inputs / "pydicom" / "dicomdirtests" / "98892001"), "-o", str(tmp_path / "o3"), "--series",
               CT5N_UID, "--tasks", "segment", "--prompts-file", str(prompts), "--workers", "0", "--no-progress")
    assert code == 0, capsys.readouterr().err
    folder = series_dir(tmp_path / "o3", D.SeriesSpec(CT5N_UID, _study_of(CT5N)))
    res = json.loads((folder / "result.json").read_text())
    assert "classification" not in res and res["segmentation"][0]["prompt"] == PROMPT
    # heatmaps over all vision blocks: another configuration, said in the result; a bad value is exit 2
    assert run(str(inputs), "-o", str(tmp_path / "o4"), "--explain-blocks", "many") == 2
    assert "explain blocks must be" in capsys.readouterr().err
    assert run(str(inputs), "-o", str(tmp_path / "o6"), "--tasks", "explain", "--explain-blocks", "7") == 2  # depth 6
    assert "exceeds the 6 vision blocks" in capsys.readouterr().err and not (tmp_path / "o6").exists()
    code = run(str(inputs / "pydicom" / "dicomdirtests" / "98892001"), "-o", str(tmp_path / "o5"), "--series",
               CT5N_UID, "--tasks", "explain", "--explain-target", PROMPT, "--explain-blocks", "all", "--workers", "0",
               "--explain-gradient", "direct", "--no-progress")
    assert code == 0, capsys.readouterr().err
    res = json.loads((series_dir(tmp_path / "o5", D.SeriesSpec(CT5N_UID, _study_of(CT5N))) / "result.json").read_text())
    assert res["explanations"][0]["blocks"] > 1 and res["config"]["explain_blocks"] == "all"
    assert res["explanations"][0]["gradient"] == "direct" and res["config"]["explain_gradient"] == "direct"
    default = BatchConfig(out_dir="x")
    assert (default.blocks, default.gradient) == ("all", "direct")
    assert BatchConfig(out_dir="x", explain_blocks="all", explain_gradient="direct").fingerprint() == default.fingerprint()
    assert BatchConfig(out_dir="x", explain_gradient="exact").fingerprint() != default.fingerprint()
    paper = BatchConfig(out_dir="x", explain_blocks="last", explain_gradient="exact")
    assert paper.fingerprint() != default.fingerprint()
    # the attention map has one block and no gradient: those are its defaults
    attention = BatchConfig(out_dir="x", explain_method="attention")
    assert (attention.blocks, attention.gradient) == ("last", "exact")
    assert attention.fingerprint() == BatchConfig(out_dir="x", explain_method="attention", explain_blocks="last",
                                                  explain_gradient="exact").fingerprint()
    with pytest.raises(ValueError, match="explain gradient must be one of"):
        BatchConfig(out_dir="x", explain_gradient="fast")
    with pytest.raises(ValueError, match="'attention' has the last block and the exact gradient only"):
        BatchConfig(out_dir="x", explain_method="attention", explain_gradient="direct")
    with pytest.raises(ValueError, match="blocks 'all'"):
        BatchConfig(out_dir="x", explain_method="attention", explain_blocks="all")


def _study_of(folder) -> str:
    return str(pydicom.dcmread(next(Path(folder).iterdir()), stop_before_pixels=True).StudyInstanceUID)


def test_projection_images_get_secondary_capture_heatmaps(inputs, tmp_path):
    """pydicom's real CR images (no frame of reference): SEG and SR as for CT, heatmaps as Secondary
    Capture images that name their source image (a parametric map needs a frame of reference)."""
    out = tmp_path / "cr"
    cfg = BatchConfig(out_dir=str(out), prompts=(PROMPT,))
    result = run_batch(inputs, out, cfg, Selection.build(modalities=["CR"]), executor="local", workers=0,
                       progress=False)
    ok = result.by_status("ok")
    assert len(ok) == 3 and all(r["family"] == "chest" for r in ok)
    for spec in scan_folder(inputs, Selection.build(modalities=["CR"])).specs:
        folder = series_dir(out, spec)
        src = pydicom.dcmread(spec.files[0], stop_before_pixels=True)
        res = json.loads((folder / "result.json").read_text())
        (name,) = res["explanations"][0]["files"]
        sc = pydicom.dcmread(folder / name)
        assert sc.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage
        assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
        assert sc.StudyInstanceUID == src.StudyInstanceUID and sc.pixel_array.shape == (src.Rows, src.Columns)
        if any(f.get("segment_number") for f in res["segmentation"]):
            seg = pydicom.dcmread(folder / "seg.dcm")
            assert check_derived(seg, [src])["referenced_instances"] == 1
        sr = hd.sr.srread(str(folder / "sr.dcm"))
        (group,) = sr.content.get_image_measurement_groups()
        assert group.get_qualitative_evaluations()[0].value.meaning == res["classification"]["classes"][0]["class"]


# ----------------------------------------------------------------------------- DICOMweb (Orthanc)
@pytest.fixture(scope="module")
def orthanc(inputs, tmp_path_factory):
    why = orthanc_available()
    if why:
        pytest.fail(f"Orthanc is needed for the DICOMweb batch test: {why}")
    with Orthanc(tmp_path_factory.mktemp("orthanc")) as o:
        o.store(sorted(CT5N.iterdir()))
        o.store(sorted((inputs / "site" / "patient" / "series1").glob("*.dcm")))
        o.store(sorted((inputs / "site" / "faults" / "missing").glob("*.dcm")))
        o.store([TEST_FILES / "test-SR.dcm"])
        yield o


def test_dicomweb_source_and_stow_back(orthanc, tmp_path):
    out = tmp_path / "dw"
    cfg = BatchConfig(out_dir=str(out), prompts=(PROMPT,))
    result = run_batch(orthanc.dicomweb_url, out, cfg, Selection.build(modalities=["CT"]), executor="local",
                       workers=0, stow=True, progress=False)
    status = {r["series_uid"]: r for r in result.rows}
    phantom = next(iter(PHANTOMS))
    assert status[CT5N_UID]["status"] == "ok" and status[phantom]["status"] == "ok"
    assert status[BAD["missing"]]["status"] == "failed" and status[BAD["missing"]]["kind"] == D.MISSING_SLICES
    assert result.exit_code == 1 and [e.series_uid for e in result.errors] == [BAD["missing"]]
    # what went back to Orthanc references the source series
    client = orthanc.client()
    for uid in (CT5N_UID, phantom):
        assert status[uid]["stowed"] == 3                                 # SEG, heatmap, SR
        study = status[uid]["study_uid"]
        derived = {}
        for s in client.search_for_series(study, search_filters={"Modality": "SEG"}) + \
                client.search_for_series(study, search_filters={"Modality": "SR"}):
            inst = client.retrieve_series(study, s["0020000E"]["Value"][0])
            derived[inst[0].Modality] = inst[0]
        assert set(derived) >= {"SEG", "SR"}
        seg = derived["SEG"]
        assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == uid
        local = series_dir(out, D.SeriesSpec(uid, study))
        assert seg.SOPInstanceUID == pydicom.dcmread(local / "seg.dcm", stop_before_pixels=True).SOPInstanceUID
        # the fetched copy of the series is what the outputs were checked against
        fetched = tmp_path / f"fetched_{uid[-4:]}"
        fetched.mkdir()
        for k, ds in enumerate(client.retrieve_series(study, uid)):
            ds.save_as(fetched / f"{k}.dcm", write_like_original=False)
        check_series_outputs(local, sorted(fetched.iterdir()))
        back, names = read_seg(local / "seg.dcm", fetched)
        assert back.shape[0] == len(sorted_series_files(fetched)) and PROMPT in names.values()
    # a rerun with --stow sends nothing twice and redoes nothing
    again = run_batch(orthanc.dicomweb_url, out, cfg, Selection.build(series=[CT5N_UID]), executor="local",
                      workers=0, stow=True, progress=False)
    assert [r["status"] for r in again.rows] == ["skipped"] and again.exit_code == 0
    assert len(client.search_for_series(search_filters={"Modality": "SEG"})) == 2


# ----------------------------------------------------------------------------- Ray
def test_ray_two_workers_match_the_local_results(inputs, local_run, tmp_path):
    try:
        import ray
    except ImportError as e:
        pytest.skip(f"ray is not importable: {e}")
    out_local = local_run[0]
    out = tmp_path / "ray"
    cfg = BatchConfig(out_dir=str(out), prompts=(PROMPT,))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        result = run_batch(inputs, out, cfg, Selection.build(studies=[STUDY, _study_of(CT5N)]), executor="ray",
                           workers=2, progress=False)
    finally:
        ray.shutdown()
    ok = result.by_status("ok")
    assert {r["series_uid"] for r in ok} == {CT5N_UID, *PHANTOMS}
    assert len({r["worker"] for r in ok}) == 2                          # both actors worked
    assert {r["model_loads"] for r in ok} == {1}                         # each loaded the models once
    assert result.exit_code == 1                                         # the faulty phantoms are in the study
    for spec in scan_folder(inputs, Selection.build(series=[CT5N_UID, *PHANTOMS])).specs:
        a = json.loads((series_dir(out, spec) / "result.json").read_text())
        b = json.loads((series_dir(out_local, spec) / "result.json").read_text())
        assert a["classification"]["classes"] == b["classification"]["classes"]
        assert [f["voxels"] for f in a["segmentation"]] == [f["voxels"] for f in b["segmentation"]]
        check_series_outputs(series_dir(out, spec), spec.files)
