"""DICOM SEG writing/reading (highdicom) on pydicom's real CT5N series and on a phantom series."""
from pathlib import Path

import numpy as np
import pydicom
import pytest
from skimage.color import lab2rgb
import SimpleITK as sitk

from clinlens.data.dicom_io import write_ct_series
from clinlens.data.dicom_seg import SEGMENT_RGB, read_seg, sorted_series_files, write_seg
from clinlens.data.image_io import load_image
from clinlens.data.phantoms import make_ct

CT5N = Path(pydicom.data.__file__).parent / "test_files" / "dicomdirtests" / "98892001" / "CT5N"


def test_gdcm_order_is_the_loaded_z_order():
    """The SEG frames follow SimpleITK's GDCM order; that must be the z order load_image gives."""
    files = sorted_series_files(CT5N)
    r = sitk.ImageSeriesReader()
    r.SetFileNames(files)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(r.Execute()), load_image(CT5N).array)


@pytest.mark.parametrize("which", ["ct5n", "phantom"])
def test_seg_round_trip_keeps_masks_and_names(which, tmp_path):
    if which == "ct5n":
        folder = CT5N
    else:
        folder = tmp_path / "series"
        write_ct_series(make_ct(3, shape=(12, 40, 48)), folder)
    shape = load_image(folder).array.shape
    lab = np.zeros(shape, np.uint8)
    lab[1, 2:6, 3:9] = 7
    lab[-2, 5:9, 1:4] = 2
    out = write_seg(folder, lab, {7: "lung mass", 2: "lung nodule"}, tmp_path / "seg.dcm")
    ds = pydicom.dcmread(out)
    assert ds.Modality == "SEG"
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == pydicom.dcmread(sorted_series_files(folder)[0]).SeriesInstanceUID
    back, names = read_seg(out, folder)
    assert sorted(names.values()) == ["lung mass", "lung nodule"]
    # every segment carries a display colour (OHIF warns and picks its own without one), distinct per segment
    rgb = [lab2rgb(np.array([[[v[0] * 100 / 65535, v[1] * 255 / 65535 - 128, v[2] * 255 / 65535 - 128]]]))[0, 0] * 255
           for v in (d.RecommendedDisplayCIELabValue for d in ds.SegmentSequence)]
    np.testing.assert_allclose(rgb[0], SEGMENT_RGB[0], atol=2)
    np.testing.assert_allclose(rgb[1], SEGMENT_RGB[1], atol=2)
    for value, name in ((7, "lung mass"), (2, "lung nodule")):
        num = next(k for k, v in names.items() if v == name)
        np.testing.assert_array_equal(back == num, lab == value)


def test_seg_refuses_bad_labels(tmp_path):
    with pytest.raises(ValueError, match="does not match"):
        write_seg(CT5N, np.ones((4, 16, 16), np.uint8), {}, tmp_path / "a.dcm")
    with pytest.raises(ValueError, match="empty"):
        write_seg(CT5N, np.zeros((5, 16, 16), np.uint8), {}, tmp_path / "b.dcm")
    assert not list(tmp_path.iterdir())
