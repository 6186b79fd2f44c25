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
    """A local datastore that checks what it is given and loses nothing.

    - `save_label` checks the image exists and the upload is an image of the image's shape.
    - A `final` label's segment names are mapped onto the vocabulary (`map_segments`) and the
      mapping is kept in the label info; unknown names are kept and reported, never dropped.
    - Feedback in the save params (`{"feedback": {...}}`) is validated by `feedback_check`
      before anything is written (4xx otherwise) and merged into the image info.
    - The training and scoring subprocesses write the same `datastore_v2.json`. Reads see their
      writes (the index is re-read when its file changed), and every write re-reads it under the
      lock first: a write from a stale copy would drop the labels and info saved meanwhile.
    """

    def __init__(self, *args, vocabulary=(), feedback_check=None, **kw):
        self.vocabulary = tuple(vocabulary)
        self.feedback_check = feedback_check  # (image_id, image_uri, payload) -> normalised feedback
        super().__init__(*args, **kw)

    # The index as the other processes left it: re-read whenever the file changed (one stat per access).
    @property
    def _datastore(self):
        if "_ds" in self.__dict__ and not self.__dict__.get("_writing"):
            self._refresh_from_file()
        return self.__dict__["_ds"]

    @_datastore.setter
    def _datastore(self, value):
        self.__dict__["_ds"] = value

    def _refresh_from_file(self) -> None:
        from monailabel.datastore.local import LocalDatastoreModel

        path = self._datastore_config_path
        try:
            ts = os.stat(path).st_mtime
            if ts == self._config_ts:
                return
            with open(path) as fp:
                ds = LocalDatastoreModel.model_validate_json(fp.read())
        except (OSError, ValueError):  # gone, or caught mid-write by another process: keep what we have
            return
        ds.base_path = self._datastore_path
        self.__dict__["_ds"] = ds
        self._config_ts = ts

    def _locked(self, mutate):
        from filelock import FileLock

        with FileLock(self._lock_file):
            self._refresh_from_file()
            self.__dict__["_writing"] = True
            try:
                out = mutate()
                self._update_datastore_file(lock=False)
            finally:
                self.__dict__["_writing"] = False
        return out

    def save_label(self, image_id, label_filename, label_tag, label_info):
        import shutil
        import time

        from monailabel.datastore.local import DataModel

        uri = self.get_image_uri(image_id)
        if not uri or not os.path.exists(uri):
            raise HTTPException(status_code=404, detail=f"image '{image_id}' is not in the datastore")
        check_label(uri, label_filename)
        info = dict(label_info or {})
        feedback = info.pop("feedback", None)
        if feedback is not None:
            if self.feedback_check is None:
                raise HTTPException(status_code=422, detail="this datastore takes no feedback")
            try:
                feedback = self.feedback_check(image_id, uri, feedback)
            except RequestError as e:
                raise HTTPException(status_code=422, detail=str(e)) from e
        tag = str(getattr(label_tag, "value", label_tag))
        if tag == DefaultLabelTag.FINAL.value:
            from clinlens.activelearning.feedback import SEGMENTS_KEY, map_segments

            info[SEGMENTS_KEY] = map_segments(_segment_names(info), self.vocabulary)
            if info[SEGMENTS_KEY]["unknown"]:
                logger.warning(f"{image_id}: segment name(s) {info[SEGMENTS_KEY]['unknown']} match no finding or "
                               "concept; kept under their own names")
        _, ext = self._to_id(os.path.basename(label_filename))
        name = self._filename(image_id, ext)
        dest = os.path.join(self._datastore.label_path(tag), name)

        def write():
            obj = self._datastore.objects.get(image_id)
            if not obj:
                raise HTTPException(status_code=404, detail=f"image '{image_id}' is not in the datastore")
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            tmp = dest + ".part"
            shutil.copy(label_filename, tmp)
            os.replace(tmp, dest)
            info.update(ts=int(time.time()), name=name)
            obj.labels[tag] = DataModel(info=info, ext=ext)
            if feedback:
                self._merge_feedback(obj, feedback)

        self._locked(write)
        logger.info(f"saved {tag} label for {image_id}")
        return image_id

    @staticmethod
    def _merge_feedback(obj, feedback: dict) -> None:
        from clinlens.activelearning.feedback import FEEDBACK_KEY, merge_feedback

        obj.image.info[FEEDBACK_KEY] = merge_feedback(obj.image.info.get(FEEDBACK_KEY), feedback)

    def save_feedback(self, image_id: str, payload) -> dict:
        """Validate and merge feedback into the image info; returns the stored feedback (4xx on bad input)."""
        from clinlens.activelearning.feedback import FEEDBACK_KEY

        uri = self.get_image_uri(image_id)
        if not uri or not os.path.exists(uri):
            raise HTTPException(status_code=404, detail=f"image '{image_id}' is not in the datastore")
        try:
            feedback = self.feedback_check(image_id, uri, payload)
        except RequestError as e:
            raise HTTPException(status_code=422, detail=str(e)) from e

        def write():
            obj = self._datastore.objects[image_id]
            self._merge_feedback(obj, feedback)
            return dict(obj.image.info[FEEDBACK_KEY])

        return self._locked(write)

    def update_image_info(self, image_id, info):
        def write():
            obj = self._datastore.objects.get(image_id)
            if not obj:
                raise HTTPException(status_code=404, detail=f"image '{image_id}' is not in the datastore")
            obj.image.info.update(info)

        self._locked(write)

    def update_label_info(self, label_id, label_tag, info):
        def write():
            obj = self._datastore.objects.get(label_id)
            tag = str(getattr(label_tag, "value", label_tag))
            if not obj or tag not in obj.labels:
                raise HTTPException(status_code=404, detail=f"no '{tag}' label for '{label_id}'")
            obj.labels[tag].info.update(info)

        self._locked(write)


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
