"""Local datastore that refuses bad labels before anything is written (4xx, nothing lost)."""
from __future__ import annotations

import os

import numpy as np
from fastapi import HTTPException
from monailabel.datastore.local import LocalDatastore

from clinlens.data.conventions import RequestError
from clinlens.data.image_io import load_image


def _squeeze(shape) -> tuple:
    return tuple(s for s in shape if s != 1)


class CheckedLocalDatastore(LocalDatastore):
    """`save_label` checks the image exists and the upload is an image of the image's shape."""

    def save_label(self, image_id, label_filename, label_tag, label_info):
        uri = self.get_image_uri(image_id)
        if not uri or not os.path.exists(uri):
            raise HTTPException(status_code=404, detail=f"image '{image_id}' is not in the datastore")
        try:
            label = load_image(label_filename)
        except RequestError as e:
            raise HTTPException(status_code=422, detail=f"label upload rejected: {e}") from e
        image_shape = load_image(uri).spatial_shape
        if _squeeze(label.spatial_shape) != _squeeze(image_shape):
            raise HTTPException(
                status_code=422,
                detail=f"label shape {label.spatial_shape} does not match image shape {image_shape} (array order)",
            )
        arr = label.array
        if label.is_rgb or not (np.issubdtype(arr.dtype, np.integer) or np.all(np.mod(arr, 1) == 0)):
            raise HTTPException(status_code=422, detail="a label must be a single-channel integer labelmap")
        return super().save_label(image_id, label_filename, label_tag, label_info)
