"""Reading images and writing labelmaps in the image's own geometry (SimpleITK).

Arrays are in array order, as SimpleITK returns them: 2D [y, x] (RGB [y, x, 3]), 3D [z, y, x].
Viewer indices (IJK) are the reverse; `clinlens.data.conventions` owns that mapping.
SimpleITK is imported where it is used, so the array helpers (`to_unit_rgb`) load without it.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from clinlens.data.conventions import RequestError

if TYPE_CHECKING:
    import SimpleITK as sitk

IMAGE_EXTS = (".nii.gz", ".nii", ".nrrd", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".mha", ".mhd")


def file_ext(path: str | os.PathLike) -> str:
    """Extension including double suffixes such as `.nii.gz`."""
    name = str(path).lower()
    for ext in (".nii.gz", ".seg.nrrd"):
        if name.endswith(ext):
            return ext
    return Path(name).suffix


@dataclass
class LoadedImage:
    array: np.ndarray  # array order
    ref: sitk.Image  # geometry reference (spacing, origin, direction)
    path: str
    is_rgb: bool
    modality: str = ""  # DICOM Modality (0008,0060) where the image is DICOM, else ""

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        """Spatial shape in array order."""
        return tuple(self.array.shape[:-1] if self.is_rgb else self.array.shape)

    @property
    def size_ijk(self) -> tuple[int, ...]:
        """Spatial size in viewer index order (i = x fastest)."""
        return tuple(reversed(self.spatial_shape))


def _read(path: str) -> tuple[sitk.Image, str]:
    """(image, DICOM modality or "")."""
    import SimpleITK as sitk

    if os.path.isdir(path):
        from clinlens.data.dicom_io import read_series, to_sitk

        try:
            vol, geom = read_series(path)
        except ValueError as e:
            raise RequestError(f"folder {os.path.basename(path)}: {e}") from e
        return to_sitk(vol, geom), geom.get("modality", "")
    img = sitk.ReadImage(path)
    return img, (img.GetMetaData("0008|0060").strip() if img.HasMetaDataKey("0008|0060") else "")


def load_image(path: str | os.PathLike) -> LoadedImage:
    """Load a 2D/3D image or a DICOM series folder; raise `RequestError` if it is not an image."""
    import SimpleITK as sitk

    path = str(path)
    if not path or not os.path.exists(path):
        raise RequestError(f"image file not found: {path!r}", status=404)
    try:
        img, modality = _read(path)
    except RuntimeError as e:
        raise RequestError(f"{os.path.basename(path)} is not a readable image ({str(e).strip().splitlines()[-1][:200]})") from e
    arr = sitk.GetArrayFromImage(img)
    is_rgb = img.GetNumberOfComponentsPerPixel() > 1
    if is_rgb and arr.shape[-1] == 4:
        arr = arr[..., :3]
    return LoadedImage(array=arr, ref=img, path=path, is_rgb=is_rgb, modality=modality)


def write_label(mask: np.ndarray, like: LoadedImage, ext: str | None = None, out_path: str | None = None) -> str:
    """Write a uint8 labelmap (or a float32 map, e.g. a heatmap; array order, the image's spatial shape)
    with the image's geometry.

    `ext` defaults to the image's own format (Slicer); OHIF asks for `.nrrd`. A DICOM folder or
    an RGB PNG gets NIfTI/PNG labels respectively.
    """
    import SimpleITK as sitk

    mask = np.asarray(mask)
    if mask.shape != like.spatial_shape:
        raise ValueError(f"label shape {mask.shape} != image shape {like.spatial_shape}")
    if ext is None:
        ext = ".nii.gz" if os.path.isdir(like.path) else file_ext(like.path)
    ext = ext if ext.startswith(".") else "." + ext
    if ext in (".jpg", ".jpeg"):
        ext = ".png"  # labels must be lossless
    lab = sitk.GetImageFromArray(mask.astype(np.float32 if mask.dtype == np.float32 else np.uint8))
    ref = like.ref
    if ref.GetDimension() == lab.GetDimension():
        lab.SetSpacing(ref.GetSpacing())
        lab.SetOrigin(ref.GetOrigin())
        lab.SetDirection(ref.GetDirection())
    if out_path is None:
        fd, out_path = tempfile.mkstemp(suffix=ext, prefix="clinlens_")
        os.close(fd)
    sitk.WriteImage(lab, out_path, useCompression=ext not in (".nrrd",))
    return out_path


def to_unit_rgb(image2d: np.ndarray) -> np.ndarray:
    """A 2D slice (grey or RGB, any dtype) -> float32 [H, W, 3] in [0, 1].

    uint8 is divided by 255; Hounsfield-like data (min below -200) gets a lung-friendly window
    [-1000, 400]; anything else is scaled between its 0.5 and 99.5 percentiles.
    """
    x = np.asarray(image2d)
    if x.dtype == np.uint8:
        y = x.astype(np.float32) / 255.0
    else:
        x = x.astype(np.float32)
        if x.min() < -200:
            lo, hi = -1000.0, 400.0
        elif 0.0 <= x.min() and x.max() <= 1.0:
            lo, hi = 0.0, 1.0
        else:
            lo, hi = np.percentile(x, [0.5, 99.5])
        y = np.clip((x - lo) / max(hi - lo, 1e-6), 0, 1)
    if y.ndim == 2:
        y = np.repeat(y[..., None], 3, axis=-1)
    return y.astype(np.float32)
