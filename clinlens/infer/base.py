"""Shared adapter plumbing for clinlens infer tasks: image cache, prompt parsing, errors, result files.

A task subclasses `ClinlensInfer` and implements `run(request, image) -> (mask | None, json)`; the
base turns `RequestError`s into 4xx answers and writes the labelmap in the image's geometry, in
the format the viewer asked for (`result_extension`, OHIF) or the image's own (Slicer).
"""
from __future__ import annotations

import os
import time
from collections import OrderedDict

import numpy as np
from monailabel.interfaces.tasks.infer_v2 import InferTask

from clinlens.data.conventions import RequestError
from clinlens.data.image_io import LoadedImage, load_image, write_label
from clinlens.infer.http import as_http


class ImageCache:
    """A few recently used images, keyed by path and mtime (a click must not re-read a CT)."""

    def __init__(self, size: int = 4):
        self.size = size
        self._items: OrderedDict = OrderedDict()

    def get(self, path: str) -> LoadedImage:
        try:
            key = (path, os.path.getmtime(path))
        except OSError:
            return load_image(path)  # raises the 404 RequestError
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        img = load_image(path)
        self._items[key] = img
        while len(self._items) > self.size:
            self._items.popitem(last=False)
        return img


XRAY_MODALITIES = ("CR", "DX", "RG")  # DICOM projection radiography


def family_of(image: LoadedImage) -> str:
    """Which vocabulary fits an image: RGB -> "derm"; a radiograph (DICOM CR/DX/RG, or a grey 2D image,
    or a one-slice volume with no DICOM modality, e.g. a (1, H, W) NIfTI) -> "chest"; any other volume
    (a DICOM CT or MR, even of one slice) -> "ct"."""
    if image.is_rgb:
        return "derm"
    if image.modality in XRAY_MODALITIES:
        return "chest"
    shape = image.spatial_shape
    if len(shape) == 3 and (shape[0] > 1 or image.modality):
        return "ct"
    return "chest"


def upload_path(request) -> str | None:
    """The uploaded `label` file (a mask prompt), if the request carries one (not Slicer's segment name)."""
    lab = request.get("label")
    return lab if isinstance(lab, str) and os.path.isfile(lab) else None


class ClinlensInfer(InferTask):
    images = ImageCache()

    def is_valid(self) -> bool:
        return True

    def run(self, request, image: LoadedImage):  # -> (mask in array order | None, result json)
        raise NotImplementedError

    def __call__(self, request):
        t0 = time.perf_counter()
        try:
            image = self.images.get(request["image"])
            mask, result = self.run(request, image)
        except RequestError as e:
            raise as_http(e) from e
        out = None
        if mask is not None:
            t1 = time.perf_counter()
            mask = np.asarray(mask)
            out = write_label(mask if mask.dtype == np.float32 else mask.astype(np.uint8), image,
                              ext=request.get("result_extension"))
            result.setdefault("latencies", {})["write_ms"] = round(1000 * (time.perf_counter() - t1), 1)
        result.setdefault("latencies", {})["total_ms"] = round(1000 * (time.perf_counter() - t0), 1)
        return out, result
