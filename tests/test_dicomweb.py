"""The DICOMweb path end to end: a real Orthanc (Debian packages) on loopback, the real MONAI Label
server with `--studies http://127.0.0.1:<port>/dicom-web`, and OHIF-shaped requests (image id =
SeriesInstanceUID, NRRD uint8 results, label saves that go back as DICOM SEG over STOW)."""
import contextlib
import json
from pathlib import Path

import nrrd
import numpy as np
import pydicom
import pytest
import requests

from clinlens.data.dicom_seg import read_seg
from clinlens.data.image_io import load_image
from clinlens.orthanc import Orthanc, orthanc_available
from clinlens.server import Server, slicer_post
from clinlens.trainers.region_seg import center_click

CT5N = Path(pydicom.data.__file__).parent / "test_files" / "dicomdirtests" / "98892001" / "CT5N"
OHIF = {"result_extension": ".nrrd", "result_dtype": "uint8", "result_compress": False, "restore_label_idx": False}


def ohif_post(url, params, files=None):
    """What OHIF v3's MONAI Label client sends: a browser multipart form with a `params` JSON field."""
    return requests.post(url, files={"params": (None, json.dumps(params)), **(files or {})})


def series_uid(folder) -> str:
    return pydicom.dcmread(next(Path(folder).iterdir()), stop_before_pixels=True).SeriesInstanceUID


def nrrd_mask(content: bytes, tmp: Path) -> np.ndarray:
    p = tmp / "result.nrrd"
    p.write_bytes(content)
    arr, _ = nrrd.read(str(p), index_order="C")  # (z, y, x), the project's array order
    return arr


def ct_study(root: Path, n_chest: int = 0, n_derm: int = 0) -> tuple[dict, Path]:
    """A labelled studies folder under `root` with one 24x96x128 CT phantom: (its index entry, its DICOM folder)."""
    from clinlens.data.studies import make_studies

    make_studies(root / "studies", n_chest=n_chest, n_derm=n_derm, n_ct=1, labelled_fraction=1.0, seed=11,
                 ct_shape=(24, 96, 128), progress=False)
    ct = json.loads((root / "studies" / "clinlens" / "ct_000.json").read_text())
    return ct, root / "studies" / ct["dicom"]["folder"]


@contextlib.contextmanager
def orthanc_with_ct(root: Path, what: str, **studies):
    """A real Orthanc under `root` holding `ct_study(root, **studies)`: yields (orthanc, index entry, DICOM folder)."""
    why = orthanc_available()
    if why:
        pytest.fail(f"Orthanc is needed for {what}: {why}")
    ct, folder = ct_study(root, **studies)
    with Orthanc(root / "orthanc") as o:
        o.store(sorted(folder.glob("*.dcm")))
        yield o, ct, folder


def dicomweb_server(o: Orthanc, root: Path) -> Server:
    """The MONAI Label server on that Orthanc's DICOMweb, its cache and models under `root`."""
    env = {"MONAI_LABEL_DICOMWEB_CACHE_PATH": str(root / "cache")}
    return Server(o.dicomweb_url, log_path=root / "server.log", env=env, conf={"model_dir": root / "model"})


@pytest.fixture(scope="module")
def dw(tmp_path_factory):
    root = tmp_path_factory.mktemp("dicomweb")
    with orthanc_with_ct(root, "the DICOMweb tests", n_chest=1, n_derm=1) as (o, ct, folder):
        o.store(sorted(CT5N.iterdir()))
        with dicomweb_server(o, root) as s:
            s.orthanc, s.root, s.ct = o, root, ct
            s.ct_uid = series_uid(folder)
            yield s
    print(f"server log: {root / 'server.log'}")


def test_orthanc_serves_the_series(dw):
    uids = {s["0020000E"]["Value"][0] for s in dw.orthanc.series(Modality="CT")}
    assert uids == {dw.ct_uid, series_uid(CT5N)}


def test_region_seg_3d_on_a_dicomweb_ct_finds_the_finding(dw, tmp_path):
    """One OHIF click on the finding's largest slice -> a 3D NRRD mask on the DICOM grid that overlaps
    the ground truth (wrong slice order or axes would give ~0 overlap; the quality figures are the
    benchmark's, this is a coarse bound)."""
    studies = dw.root / "studies"
    truth = load_image(studies / dw.ct["label"]).array
    name, idx = max(dw.ct["labels"].items(), key=lambda kv: (truth == kv[1]).sum())
    target = truth == idx
    z = int(np.argmax(target.sum(axis=(1, 2))))
    x, y = center_click(target[z])
    r = ohif_post(f"{dw.url}/infer/region_seg_3d?image={dw.ct_uid}&output=image",
                  {"foreground": [[int(x), int(y), z]], "background": [], **OHIF})
    assert r.status_code == 200, r.text
    mask = nrrd_mask(r.content, tmp_path) > 0
    assert mask.shape == target.shape
    dice = 2 * (mask & target).sum() / (mask.sum() + target.sum())
    assert dice > 0.25, f"{name}: Dice {dice:.3f} on the DICOMweb volume"
    assert mask[z, int(y), int(x)]
    assert mask.any(axis=(1, 2)).sum() > 1  # propagated beyond the clicked slice


def test_real_pydicom_ct_series_over_dicomweb(dw, tmp_path):
    """pydicom's real CT5N (5 slices of 16x16) through Orthanc: 2D Slicer-shaped and 3D OHIF-shaped."""
    uid = series_uid(CT5N)
    r = ohif_post(f"{dw.url}/infer/region_seg_3d?image={uid}&output=image",
                  {"foreground": [[8, 8, 2]], "background": [], **OHIF})
    assert r.status_code == 200, r.text
    assert nrrd_mask(r.content, tmp_path).shape == (5, 16, 16)
    r = slicer_post(f"{dw.url}/infer/region_seg?image={uid}&output=all",
                    {"foreground": [[8, 8, 2]], "background": [], "slice": 2})
    assert r.status_code == 200, r.text
    r = slicer_post(f"{dw.url}/infer/region_seg?image={uid}&output=all",
                    {"foreground": [[8, 8, 7]], "background": [], "slice": 7})
    assert 400 <= r.status_code < 500 and "outside the image" in r.text


def test_ohif_concept_regions_on_a_ct_series_and_a_dicom_radiograph(dw, tmp_path):
    """OHIF lists `concept_regions` (a segmentation): on the CT series it answers with the CT vocabulary, a
    labelmap on the volume's grid with regions on one slice; on a single-frame DX radiograph from the same
    DICOMweb server, with the chest vocabulary (a one-frame series must not be read as CT)."""
    from test_concepts import _dx_copy

    from clinlens.trainers.concepts import CSR_FAMILIES

    dx = _dx_copy(tmp_path / "dx.dcm")
    dw.orthanc.store([dx])
    dx_uid = pydicom.dcmread(dx, stop_before_pixels=True).SeriesInstanceUID
    for uid, family, shape in ((dw.ct_uid, "ct", (24, 96, 128)), (dx_uid, "chest", (1, 128, 128))):
        r = ohif_post(f"{dw.url}/infer/concept_regions?image={uid}&output=image", {**OHIF, "top_concepts": 6})
        assert r.status_code == 200, r.text
        lab = nrrd_mask(r.content, tmp_path)
        assert lab.shape == shape and lab.any(), family
        assert lab.any(axis=(1, 2)).sum() == 1  # one slice's evidence
        r = ohif_post(f"{dw.url}/infer/concept_regions?image={uid}&output=json", {**OHIF, "top_concepts": 6})
        assert r.status_code == 200, r.text
        regions = r.json()["regions"]
        assert regions and {g["concept"] for g in regions} <= set(CSR_FAMILIES[family][0]), (family, regions)


def test_unknown_series_is_a_404(dw):
    r = ohif_post(f"{dw.url}/infer/region_seg_3d?image=1.2.3.4.5&output=image", {"foreground": [[1, 1, 1]], **OHIF})
    assert r.status_code == 404 and "1.2.3.4.5" in r.text


def test_final_label_goes_back_to_orthanc_as_dicom_seg(dw, tmp_path):
    studies = dw.root / "studies"
    before = dw.orthanc.series(Modality="SEG")
    # a wrong-shaped label is refused before anything reaches Orthanc
    bad = tmp_path / "bad.nrrd"
    nrrd.write(str(bad), np.zeros((3, 4, 5), np.uint8), index_order="C")
    with open(bad, "rb") as f:
        r = requests.put(f"{dw.url}/datastore/label?image={dw.ct_uid}&tag=final",
                         files={"label": ("bad.nrrd", f), "params": (None, json.dumps({"label_info": []}))})
    assert r.status_code == 422 and "shape" in r.text
    assert len(dw.orthanc.series(Modality="SEG")) == len(before)

    truth = load_image(studies / dw.ct["label"]).array.astype(np.uint8)
    lab = tmp_path / "label.nrrd"
    nrrd.write(str(lab), truth, index_order="C")
    info = [{"name": n, "idx": i} for n, i in dw.ct["labels"].items()]
    with open(lab, "rb") as f:
        r = requests.put(f"{dw.url}/datastore/label?image={dw.ct_uid}&tag=final",
                         files={"label": ("label.nrrd", f), "params": (None, json.dumps({"label_info": info}))})
    assert r.status_code == 200, r.text
    segs = dw.orthanc.series(Modality="SEG")
    assert len(segs) == len(before) + 1
    seg_meta = dw.orthanc.client().retrieve_series_metadata(segs[-1]["0020000D"]["Value"][0],
                                                            segs[-1]["0020000E"]["Value"][0])
    ref = pydicom.Dataset.from_json(seg_meta[0]).ReferencedSeriesSequence[0].SeriesInstanceUID
    assert ref == dw.ct_uid
    inst = dw.orthanc.client().retrieve_series(segs[-1]["0020000D"]["Value"][0], segs[-1]["0020000E"]["Value"][0])
    inst[0].save_as(tmp_path / "seg.dcm")
    back, names = read_seg(tmp_path / "seg.dcm", studies / dw.ct["dicom"]["folder"])
    for n, i in dw.ct["labels"].items():
        num = next(k for k, v in names.items() if v == n)
        np.testing.assert_array_equal(back == num, truth == i)
