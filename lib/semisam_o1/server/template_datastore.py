"""The app's datastore: MONAI Label's ``LocalDatastore`` that checks a clinician's label before keeping it.

A ``final`` label (PUT /datastore/label?tag=final, from 3D Slicer, OHIF or curl) becomes a template
at once, so it is read with the image (:func:`~semisam_o1.volumes.load_label`: shape, geometry, integer
values in the label map, not empty) BEFORE anything is written: a bad label is refused with HTTP 422
naming the problem and the label that was there stays untouched. Accepted labels are stored as
NIfTI with the image's exact header, whatever format the client sent (Slicer sends NRRD), so every
later reader sees the image's voxel grid.

Every id, tag and file name is checked first (:class:`~semisam_o1.server.safe_datastore.NameChecks`):
nothing is read, written or deleted outside the datastore folder. Images whose file names are not
valid ids (e.g. with spaces) cannot be used; the server names them in a warning at start-up.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Callable

from fastapi import HTTPException
from monailabel.interfaces.datastore import DefaultLabelTag

from semisam_o1.safe_names import RULE, is_safe_name
from semisam_o1.server.atomic_datastore import (
    AtomicLocalDatastore as LocalDatastore,  # MONAI Label's, crash-safe writes
)
from semisam_o1.server.errors import client_errors
from semisam_o1.server.safe_datastore import NameChecks
from semisam_o1.volumes import InputError, load_image, load_label, save_label

logger = logging.getLogger(__name__)

#: Label values are stored as uint8.
MAX_LABEL_VALUE = 255


class FinalLabelChecks(LocalDatastore):
    """``LocalDatastore(studies, ...)`` plus ``label_values()``: the allowed values (``None``: any up to 255)."""

    def __init__(self, *args, label_values: Callable[[], set[int] | None], **kwargs):
        super().__init__(*args, **kwargs)
        self.label_values = label_values

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info) -> str:
        if label_tag != DefaultLabelTag.FINAL:
            return super().save_label(image_id, label_filename, label_tag, label_info)
        if image_id not in self.list_images():
            raise HTTPException(status_code=404, detail=f"image '{image_id}' is not in the datastore")
        with client_errors(), tempfile.TemporaryDirectory() as tmp:
            image = load_image(self.get_image_uri(image_id))
            try:
                label = load_label(label_filename, image, allowed=self.label_values())
                if label.max() > MAX_LABEL_VALUE:
                    raise InputError(f"{label_filename}: label value {label.max()} is above {MAX_LABEL_VALUE}")
            except InputError as e:  # name what the client sent, not the server's temporary file
                raise InputError(str(e).replace(str(label_filename), f"label for image '{image_id}'")) from None
            checked = save_label(label, image, Path(tmp) / f"{image_id}.nii.gz")
            return super().save_label(image_id, str(checked), label_tag, label_info)


class TemplateDatastore(NameChecks, FinalLabelChecks):
    """The app's local datastore: names checked first, then ``final`` labels checked before they are kept."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        unusable = sorted(i for i in self.list_images() if not is_safe_name(i))
        if unusable:
            logger.warning(f"{len(unusable)} image(s) cannot be served, their ids are not valid names ({RULE}); "
                           f"rename the files: {', '.join(repr(i) for i in unusable[:10])}")
