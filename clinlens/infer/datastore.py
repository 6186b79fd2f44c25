"""Datastores that refuse bad labels before anything is written (4xx, nothing lost).

- `CheckedLocalDatastore`: a studies folder.
- `save_result`: results without a label file (classification, concepts) are kept in the image
  info under `clinlens_results`, so `/batch/infer/<model>` persists them too; stock MONAI Label
  only saves results that come with a label file.
- `ClinlensDICOMWebDatastore`: a DICOMweb server (Orthanc, the way OHIF opens it). Image id =
  SeriesInstanceUID; series are cached and converted to NIfTI by MONAI Label. `final` labels go
  back as DICOM SEG over STOW, written by highdicom (`clinlens.data.dicom_seg`), so no dcmqi
  binary has to be downloaded.
"""
from __future__ import annotations

import datetime
import logging
import os
import pathlib
import threading

import numpy as np
from fastapi import HTTPException
from monailabel.datastore.dicom import DICOMWebDatastore
from monailabel.datastore.local import LocalDatastore
from monailabel.interfaces.datastore import DefaultLabelTag

from clinlens.data.conventions import RequestError
from clinlens.data.image_io import load_image

logger = logging.getLogger(__name__)


RESULTS_KEY = "clinlens_results"
_RESULTS_LOCK = threading.Lock()  # batch infer runs images in threads; the info update is read-modify-write


def save_result(datastore, image_id: str, model: str, params: dict, tag: str = DefaultLabelTag.ORIGINAL) -> dict:
    """Keep a label-less result in the image info: {RESULTS_KEY: {model: {tag, params, saved}}}."""
    entry = {"tag": str(getattr(tag, "value", tag)), "params": params,
             "saved": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    with _RESULTS_LOCK:
        results = dict(datastore.get_image_info(image_id).get(RESULTS_KEY) or {})
        results[model] = entry
        datastore.update_image_info(image_id, {RESULTS_KEY: results})
    return entry


def _squeeze(shape) -> tuple:
    return tuple(s for s in shape if s != 1)


def check_label(image_uri, label_filename) -> np.ndarray:
    """The uploaded labelmap as an array, or an HTTPException (404/422) that says what is wrong."""
    if not image_uri or not os.path.exists(image_uri):
        raise HTTPException(status_code=404, detail="image is not in the datastore")
    try:
        label = load_image(label_filename)
    except RequestError as e:
        raise HTTPException(status_code=422, detail=f"label upload rejected: {e}") from e
    image_shape = load_image(image_uri).spatial_shape
    if _squeeze(label.spatial_shape) != _squeeze(image_shape):
        raise HTTPException(
            status_code=422,
            detail=f"label shape {label.spatial_shape} does not match image shape {image_shape} (array order)",
        )
    arr = label.array
    if label.is_rgb or not (np.issubdtype(arr.dtype, np.integer) or np.all(np.mod(arr, 1) == 0)):
        raise HTTPException(status_code=422, detail="a label must be a single-channel integer labelmap")
    return arr.reshape(image_shape)


class CheckedLocalDatastore(LocalDatastore):
    """`save_label` checks the image exists and the upload is an image of the image's shape."""

    def save_label(self, image_id, label_filename, label_tag, label_info):
        uri = self.get_image_uri(image_id)
        if not uri or not os.path.exists(uri):
            raise HTTPException(status_code=404, detail=f"image '{image_id}' is not in the datastore")
        check_label(uri, label_filename)
        return super().save_label(image_id, label_filename, label_tag, label_info)


def _segment_names(label_info: dict) -> dict[int, str]:
    """Label value -> name from Slicer's `label_info` list ([{"name", "idx"}]) or a {name: idx} dict."""
    li = label_info.get("label_info") or label_info.get("label_names") or []
    if isinstance(li, dict):
        return {int(v): str(k) for k, v in li.items()}
    return {int(e["idx"]): str(e["name"]) for e in li if isinstance(e, dict) and "idx" in e and "name" in e}


class ClinlensDICOMWebDatastore(DICOMWebDatastore):
    def get_image_uri(self, image_id: str) -> str:
        try:
            return super().get_image_uri(image_id)
        except IndexError:  # the QIDO search found no such series
            raise HTTPException(404, f"series '{image_id}' is not on the DICOMweb server") from None
        except HTTPException:
            raise
        except Exception as e:  # noqa: BLE001 (server down, bad series): say so instead of a bare 500
            raise HTTPException(502, f"could not fetch series '{image_id}' from {self.name()}: {e}") from e

    def save_label(self, image_id, label_filename, label_tag, label_info, label_id=""):
        from monailabel.datastore.utils.convert import binary_to_image

        from clinlens.data.dicom_seg import build_seg

        image_uri = self.get_image_uri(image_id)
        tmp = []
        try:
            if "".join(pathlib.Path(label_filename).suffixes) == ".bin":  # OHIF's raw labelmap bytes
                label_filename = binary_to_image(image_uri, label_filename)
                tmp.append(label_filename)
            label = check_label(image_uri, label_filename)
            if label_tag == DefaultLabelTag.FINAL:
                image_dir = os.path.realpath(os.path.join(self._datastore.image_path(), image_id))
                try:
                    seg = build_seg(image_dir, label, _segment_names(label_info))
                except ValueError as e:
                    raise HTTPException(422, f"label not saved: {e}") from e
                self._client.store_instances([seg])
                info = self.get_image_info(image_id)
                label_info = {**label_info, "SeriesInstanceUID": seg.SeriesInstanceUID,
                              "Modality": info.get("Modality"), "PatientID": info.get("PatientID"),
                              "StudyInstanceUID": info.get("StudyInstanceUID")}
                logger.info(f"DICOM SEG {seg.SeriesInstanceUID} stored for series {image_id}")
            return LocalDatastore.save_label(self, image_id, label_filename, label_tag, label_info)
        finally:
            for f in tmp:
                if os.path.exists(f):
                    os.unlink(f)
