"""DICOM SEG from a labelmap over its source series, and back, with highdicom.

The labelmap is a ``[z, y, x]`` integer array in the order SimpleITK/GDCM sorts the series (the
order `clinlens.data.image_io.load_image` and MONAI Label's DICOMweb cache give), so frame z of the
label covers the z-th source image of `sorted_series_files`. Each label value present is one
segment; DICOM numbers segments 1..n, so they are numbered in label-value order and keep the
label's name (map names back to the app's label indices on reading).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom

import clinlens


# Segment display colours (RGB), in segment-number order: viewers (OHIF warns without them) show
# segment n in SEGMENT_RGB[(n - 1) % len]. Red first, as Slicer and OHIF do by default.
SEGMENT_RGB = ((220, 50, 50), (50, 170, 70), (60, 110, 220), (230, 200, 40), (170, 80, 200), (40, 190, 200),
               (240, 130, 40), (150, 110, 70))


def segment_cielab(n: int) -> tuple[int, int, int]:
    """DICOM-encoded RecommendedDisplayCIELabValue of segment number `n` (1-based)."""
    import highdicom as hd
    from skimage.color import rgb2lab

    lab = rgb2lab(np.array(SEGMENT_RGB[(n - 1) % len(SEGMENT_RGB)], float)[None, None] / 255)[0, 0]
    return tuple(int(v) for v in hd.color.CIELabColor(*(float(x) for x in lab)).value)


def sorted_series_files(folder) -> list[str]:
    """The series' files in SimpleITK's GDCM order (the z order of the image as loaded)."""
    import SimpleITK as sitk

    files = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder)))
    if not files:
        raise ValueError(f"no DICOM image series in {folder}")
    return files


def write_seg(source_folder, label: np.ndarray, names: dict[int, str], out_path, series_description="clinlens SEG",
              seed_uid: str | None = None) -> Path:
    """`build_seg` saved to `out_path`; returns the path."""
    out_path = Path(out_path)
    build_seg(source_folder, label, names, series_description, seed_uid).save_as(out_path)
    return out_path


def build_seg(source_folder, label: np.ndarray, names: dict[int, str], series_description="clinlens SEG",
              seed_uid: str | None = None):
    """`label` ([z, y, x] ints over the series in `source_folder`) as a DICOM SEG dataset (highdicom).

    `names` maps label value -> segment name; values without a name are called "label <i>".
    Raises ValueError on a shape mismatch or an empty label."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from clinlens.data.dicom_io import derived_uid

    files = sorted_series_files(source_folder)
    sources = [pydicom.dcmread(f) for f in files]
    label = np.asarray(label)
    if label.ndim == 2:
        label = label[None]
    shape = (len(sources), int(sources[0].Rows), int(sources[0].Columns))
    if label.shape != shape:
        raise ValueError(f"label shape {label.shape} does not match the series {shape} (slices, rows, columns)")
    values = [int(v) for v in np.unique(label) if v > 0]
    if not values:
        raise ValueError("the label is empty: no segment to write")
    algo = hd.AlgorithmIdentificationSequence(name="clinlens", version=clinlens.__version__,
                                              family=codes.DCM.ArtificialIntelligence)
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=n, segment_label=str(names.get(v, f"label {v}"))[:64],
            segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=codes.SCT.Lesion,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.SEMIAUTOMATIC, algorithm_identification=algo)
        for n, v in enumerate(values, 1)
    ]
    for d in descriptions:  # highdicom 0.22's SegmentDescription takes no colour argument
        d.RecommendedDisplayCIELabValue = list(segment_cielab(int(d.SegmentNumber)))
    dense = np.zeros(label.shape, np.uint8)
    for n, v in enumerate(values, 1):
        dense[label == v] = n
    return hd.seg.Segmentation(
        source_images=sources, pixel_array=dense, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=derived_uid(seed_uid, "seg-series"), series_number=900,
        sop_instance_uid=derived_uid(seed_uid, "seg-sop"), instance_number=1,
        manufacturer="clinlens", manufacturer_model_name="clinlens", software_versions=clinlens.__version__,
        device_serial_number="0", series_description=series_description[:64], omit_empty_frames=False,
    )


def read_seg(seg_path, source_folder) -> tuple[np.ndarray, dict[int, str]]:
    """A DICOM SEG back to a ``[z, y, x]`` labelmap over `source_folder`'s series, plus number -> name."""
    import highdicom as hd

    seg = hd.seg.segread(str(seg_path))
    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in sorted_series_files(source_folder)]
    uids = [s.SOPInstanceUID for s in sources]
    numbers = list(seg.segment_numbers)
    arr = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=numbers,
                                            combine_segments=True, relabel=False, ignore_spatial_locations=True)
    names = {n: seg.get_segment_description(n).segment_label for n in numbers}
    return np.asarray(arr), names
