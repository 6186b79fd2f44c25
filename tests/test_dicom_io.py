"""DICOM series write/read/find on real files, and the MONAI Label studies folder builder."""
import json
import shutil
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pydicom.data
import pytest
import SimpleITK as sitk
from PIL import Image

from clinlens.data import dicom_io as D
from clinlens.data import phantoms as P
from clinlens.data import studies as S

DDT = Path(pydicom.data.__file__).parent / "test_files" / "dicomdirtests"


@pytest.fixture(scope="module")
def ct():
    return P.make_ct(7, shape=(12, 40, 48), findings=["lung nodule"])


def test_write_read_roundtrip(ct, tmp_path):
    paths = D.write_ct_series(ct, tmp_path / "s", origin=(10.0, -20.0, 30.0), patient_id="P1")
    assert len(paths) == 12
    ds = pydicom.dcmread(paths[3])
    assert ds.Modality == "CT" and ds.SOPClassUID == pydicom.uid.CTImageStorage
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert [float(v) for v in ds.PixelSpacing] == pytest.approx([ct.spacing[1], ct.spacing[0]], abs=1e-4)
    assert float(ds.ImagePositionPatient[2]) == pytest.approx(30.0 + 3 * ct.spacing[2], abs=1e-3)
    assert ds.InstanceNumber == 4 and ds.PatientID == "P1" and float(ds.RescaleIntercept) == -1024
    assert (ds.pixel_array.astype(int) - 1024 == ct.image[3]).all()
    vol, g = D.read_series(tmp_path / "s")
    assert vol.dtype == np.int16 and np.array_equal(vol, ct.image)
    assert g["spacing"] == pytest.approx(ct.spacing, abs=1e-4)
    assert g["origin"] == pytest.approx((10.0, -20.0, 30.0), abs=1e-4)
    assert g["direction"] == pytest.approx((1, 0, 0, 0, 1, 0, 0, 0, 1))
    assert g["modality"] == "CT" and g["uniform"] and g["series_uid"] == ds.SeriesInstanceUID
    assert len({pydicom.dcmread(p).SOPInstanceUID for p in paths}) == 12
    # SimpleITK/GDCM reads the same volume and geometry
    r = sitk.ImageSeriesReader()
    r.SetFileNames(r.GetGDCMSeriesFileNames(str(tmp_path / "s")))
    im = r.Execute()
    assert np.array_equal(sitk.GetArrayFromImage(im), ct.image)
    assert im.GetSpacing() == pytest.approx(g["spacing"], abs=1e-4) and im.GetOrigin() == pytest.approx(g["origin"])


def test_sorted_by_position_not_filename(ct, tmp_path):
    paths = D.write_ct_series(ct, tmp_path / "a", implicit_vr=True)
    assert pydicom.dcmread(paths[0]).file_meta.TransferSyntaxUID == pydicom.uid.ImplicitVRLittleEndian
    rng = np.random.default_rng(0)
    names = rng.permutation(len(paths))
    (tmp_path / "b" / "deep").mkdir(parents=True)
    for p, n in zip(paths, names):
        shutil.copy(p, tmp_path / "b" / "deep" / f"x{n:03d}")
    (tmp_path / "b" / "notes.txt").write_text("not dicom")
    vol, g = D.read_series(tmp_path / "b")
    assert np.array_equal(vol, ct.image) and g["uniform"]
    assert g["origin"][2] == pytest.approx(-(12 - 1) * ct.spacing[2] / 2, abs=1e-3)


def test_signed_storage_and_errors(tmp_path):
    vol = np.full((3, 8, 8), -2000, np.int16)
    vol[1] = 3000
    D.write_ct_series(vol, tmp_path / "s", spacing=(1, 1, 2))
    back, g = D.read_series(tmp_path / "s")
    assert np.array_equal(back, vol)
    with pytest.raises(ValueError):
        D.write_ct_series(np.zeros((4, 4)), tmp_path / "x", spacing=(1, 1))
    with pytest.raises(ValueError):
        D.read_series(tmp_path / "nothing_here")


def _tag_geometry(folder):
    """Reference geometry straight from the tags, sorted by z position."""
    dss = sorted((pydicom.dcmread(p) for p in folder.iterdir()), key=lambda d: float(d.ImagePositionPatient[2]))
    pos = np.array([[float(v) for v in d.ImagePositionPatient] for d in dss])
    arr = np.stack([d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept) for d in dss])
    return dss, pos, arr


def test_read_real_pydicom_ct5n():
    folder = DDT / "98892001" / "CT5N"
    dss, pos, arr = _tag_geometry(folder)
    assert [d.InstanceNumber for d in dss] == [10, 9, 8, 7, 6]   # file/instance order is reversed in z
    vol, g = D.read_series(folder)
    assert vol.shape == (5, 16, 16) and np.array_equal(vol, arr)
    assert g["spacing"][2] == pytest.approx(np.diff(pos[:, 2]).mean(), abs=1e-4) == 2.5
    assert g["spacing"][:2] == pytest.approx([float(dss[0].PixelSpacing[1]), float(dss[0].PixelSpacing[0])])
    assert g["origin"] == pytest.approx(tuple(pos[0]), abs=1e-4)
    assert g["positions"] == pytest.approx(pos[:, 2] - pos[0, 2], abs=1e-4) and g["uniform"]
    assert g["study_uid"] == dss[0].StudyInstanceUID and g["modality"] == "CT"


def test_read_real_pydicom_ct2_nonuniform():
    folder = DDT / "77654033" / "CT2"
    dss, pos, arr = _tag_geometry(folder)
    vol, g = D.read_series(folder)
    assert np.array_equal(vol, arr)
    assert g["positions"] == pytest.approx(pos[:, 2] - pos[0, 2], abs=1e-4)
    assert not g["uniform"]                                    # one slice is ~200 mm from the others
    assert g["origin"] == pytest.approx(tuple(pos[0]), abs=1e-4)


@pytest.mark.filterwarnings("ignore")   # pydicom chatter about its DICOMDIR test files
def test_find_series_on_pydicom_tree():
    series = D.find_series(DDT)
    files = [p for v in series.values() for p in v]
    assert not any(p.name.startswith("DICOMDIR") or p.name.startswith("README") for p in files)
    assert not any("TINY_ALPHA" in str(p) for p in files)      # CT headers without pixel data
    expected = {}
    for p in DDT.rglob("*"):
        try:
            d = pydicom.dcmread(p, stop_before_pixels=True)
        except Exception:
            continue
        if "SeriesInstanceUID" in d and "Rows" in d and "TINY_ALPHA" not in str(p):
            expected.setdefault(d.SeriesInstanceUID, set()).add(p)
    assert {k: set(v) for k, v in series.items()} == expected
    ct5n = [k for k, v in series.items() if v[0].parent.name == "CT5N"]
    assert len(ct5n) == 1 and len(series[ct5n[0]]) == 5
    with pytest.raises(ValueError, match="several|series_uid"):
        D.read_series(DDT / "98892001")                         # CT2N + CT5N
    vol, g = D.read_series(DDT / "98892001", series_uid=ct5n[0])
    assert vol.shape == (5, 16, 16)
    with pytest.raises(ValueError, match="orientation"):
        D.read_series(DDT / "98892001" / "CT2N")                # two-plane localizer


def test_make_studies_layout(tmp_path):
    out = tmp_path / "studies"
    t = time.perf_counter()
    idx = S.make_studies(out, n_chest=3, n_derm=2, n_ct=2, labelled_fraction=0.5, seed=1, chest_size=128,
                         derm_size=96, ct_shape=(10, 48, 48), progress=False)
    first = time.perf_counter() - t
    root = sorted(p.name for p in out.iterdir())
    assert root == ["chest_000.png", "chest_001.png", "chest_002.png", "clinlens", "ct_000.nii.gz", "ct_001.nii.gz",
                    "derm_000.png", "derm_001.png", "dicom", "labels"]
    assert sorted(p.name for p in (out / "labels" / "final").iterdir()) == \
        ["chest_000.png", "chest_001.png", "ct_000.nii.gz", "derm_000.png"]     # 2/3, 1/2, 1/2 rounded half up
    assert len(idx["images"]) == 7 and idx["labels"] == S.LABELS
    for rec in idx["images"]:
        gt = json.loads((out / "clinlens" / f"{rec['id']}.json").read_text())
        img = out / rec["image"]
        if rec["family"] == "ct":
            im = sitk.ReadImage(str(img))
            arr = sitk.GetArrayFromImage(im)
            assert arr.shape == (10, 48, 48) and arr.dtype == np.int16
            nii = nib.load(str(img))
            sx, sy, sz = gt["spacing"]
            assert np.allclose(np.abs(np.diag(nii.affine)[:3]), [sx, sy, sz], atol=1e-4)
            assert nib.aff2axcodes(nii.affine) == ("L", "P", "S")      # LPS array axes, RAS affine
            vol, g = D.read_series(out / gt["dicom"]["folder"])
            assert np.array_equal(vol, arr) and g["series_uid"] == gt["dicom"]["series_uid"]
            assert im.GetOrigin() == pytest.approx(g["origin"], abs=1e-3)
            assert im.GetSpacing() == pytest.approx(g["spacing"], abs=1e-4)
        else:
            arr = np.asarray(Image.open(img))
            assert arr.dtype == np.uint8 and arr.shape == ((128, 128) if rec["family"] == "chest" else (96, 96, 3))
            assert arr.std() > 10
        assert gt["family"] == rec["family"] and gt["report"] and gt["diagnosis"] == rec["diagnosis"]
        assert set(gt["concepts"]) == set({"chest": P.CHEST_FINDINGS, "derm": P.DERM_CONCEPTS,
                                           "ct": P.CT_FINDINGS}[rec["family"]])
        if rec["label"]:
            lab = out / rec["label"]
            la = sitk.GetArrayFromImage(sitk.ReadImage(str(lab)))
            spatial = arr.shape[:2] if rec["family"] == "derm" else arr.shape
            assert la.shape == spatial and la.dtype == np.uint8
            assert set(np.unique(la)) - {0} <= set(gt["labels"].values())
            assert set(gt["labels"]) <= set(S.FAMILY_LABELS[rec["family"]])
            if rec["family"] == "ct":
                assert sitk.ReadImage(str(lab)).GetSpacing() == pytest.approx(tuple(gt["spacing"]))
            smp = P.make_sample(rec["family"], gt["seed"], **({"size": arr.shape[0]} if rec["family"] != "ct"
                                                                else {"shape": (10, 48, 48)}))
            assert np.array_equal(la, S.labelmap(smp))               # ground truth reproducible from the seed
    # second call with the same arguments is a no-op
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    t = time.perf_counter()
    assert S.make_studies(out, n_chest=3, n_derm=2, n_ct=2, labelled_fraction=0.5, seed=1, chest_size=128,
                          derm_size=96, ct_shape=(10, 48, 48), progress=False) == idx
    assert time.perf_counter() - t < max(0.2, first / 10)
    assert mtimes == {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    # changed arguments rebuild and drop stale files
    S.make_studies(out, n_chest=2, n_derm=1, n_ct=1, labelled_fraction=0.0, seed=1, chest_size=128,
                   derm_size=96, ct_shape=(10, 48, 48), dicom=False, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["chest_000.png", "chest_001.png", "clinlens", "ct_000.nii.gz",
                                                     "derm_000.png", "dicom", "labels"]
    assert not list((out / "labels" / "final").iterdir()) and not list((out / "dicom").iterdir())


def test_monailabel_datastore_lists_only_images(tmp_path):
    pytest.importorskip("monailabel")
    from monailabel.config import settings
    from monailabel.datastore.local import LocalDatastore
    S.make_studies(tmp_path, n_chest=2, n_derm=2, n_ct=1, seed=3, chest_size=96, derm_size=64,
                   ct_shape=(8, 32, 32), progress=False)
    ds = LocalDatastore(str(tmp_path), extensions=settings.MONAI_LABEL_DATASTORE_FILE_EXT, auto_reload=False)
    assert sorted(ds.list_images()) == ["chest_000", "chest_001", "ct_000", "derm_000", "derm_001"]
    assert sorted(ds.get_labeled_images()) == ["chest_000", "ct_000", "derm_000"]
