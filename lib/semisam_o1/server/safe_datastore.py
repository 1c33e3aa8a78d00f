"""Datastore methods that never let a client's name become a path outside the datastore.

MONAI Label's endpoints hand request parameters (``image``, ``id``, ``label``, ``tag``, the name of
an uploaded file) to the datastore unchanged, and ``LocalDatastore`` joins them into paths:
``PUT /datastore/?image=../../x`` wrote two folders above the datastore. :class:`NameChecks` goes
FIRST among a datastore's bases, so every public method that takes an image id, label id, label tag
or file name checks it with :mod:`semisam_o1.safe_names` before any other code of the datastore
runs, whoever calls it (an endpoint, a task, a background job):

- a name that breaks the rule -> HTTP 422 naming the parameter;
- an image or label that is not in the datastore, where MONAI Label raises its own exceptions
  (answered 500) or silently does nothing -> HTTP 404 naming it;
- an uploaded image whose file type is not one of the datastore's extensions -> HTTP 422;
- an uploaded image under the id of an image already there -> HTTP 409 naming it, unless the file
  is byte-identical (then nothing changes): replacing an image silently would leave its labels
  (a clinician's ``final`` label among them) on a volume they were not drawn on.

:class:`SafeSessions` does the same for MONAI Label's upload sessions.
"""

from __future__ import annotations

import filecmp
import os
import shutil
import tarfile
import tempfile
import zipfile

from fastapi import HTTPException
from monailabel.interfaces.exception import ImageNotFoundException, LabelNotFoundException
from monailabel.utils.sessions import Sessions

from semisam_o1.safe_names import safe_name
from semisam_o1.server.errors import client_errors
from semisam_o1.volumes import InputError, check_image_file


class NameChecks:
    """Mixin for a ``LocalDatastore`` (or subclass): checks names, answers unknown ids with 404.

    ``check_id(kind, value)`` checks image and label ids (default :func:`safe_name`; a DICOMweb
    datastore uses :func:`~semisam_o1.safe_names.dicom_uid`). Tags and file names always use
    :func:`safe_name`.
    """

    check_id = staticmethod(safe_name)

    def _checked(self, image_id=None, label_id=None, tag=None, file_name=None) -> None:
        with client_errors():
            if image_id is not None:
                self.check_id("image id", image_id)
            if label_id is not None:
                self.check_id("label id", label_id)
            if tag is not None:
                safe_name("label tag", tag)
            if file_name is not None:
                safe_name("file name", file_name)

    def _file_name(self, item_id: str, filename: str) -> tuple[str, str]:
        """``(name the datastore will write, extension)`` of ``filename`` stored under ``item_id``."""
        _, ext = self._to_id(os.path.basename(filename))
        return f"{item_id}{ext}", ext

    def add_image(self, image_id: str, image_filename: str, image_info):
        image_id = image_id or self._to_id(os.path.basename(image_filename))[0]
        name, ext = self._file_name(image_id, image_filename)
        self._checked(image_id=image_id, file_name=name)
        allowed = [e.replace("*", "") for e in self._extensions]
        if ext not in allowed:
            with client_errors():
                raise InputError(f"image '{image_id}': file type '{ext or '(none)'}' is not one of {', '.join(allowed)}")
        existing = self.get_image_uri(image_id) if image_id in self.list_images() else None
        if existing:
            if os.path.basename(existing) == name and filecmp.cmp(existing, image_filename, shallow=False):
                return image_id  # the same file again: nothing to change
            labels = sorted(self.get_labels_by_image_id(image_id))
            raise HTTPException(
                status_code=409,
                detail=f"image '{image_id}' is already in the datastore with other content"
                + (f" (labels: {', '.join(labels)})" if labels else "")
                + ": upload it under a new id, or delete the old one first (DELETE /datastore/image?id=...)",
            )
        with client_errors():  # the image itself, before the datastore keeps it (413 / 422 naming the id)
            check_image_file(image_filename, f"image '{image_id}'")
        return super().add_image(image_id, image_filename, image_info)

    def remove_image(self, image_id: str) -> None:
        self._checked(image_id=image_id)
        try:
            return super().remove_image(image_id)
        except ImageNotFoundException:
            raise HTTPException(status_code=404, detail=f"image '{image_id}' is not in the datastore") from None

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info, *args, **kwargs) -> str:
        self._checked(image_id=image_id, tag=label_tag, file_name=self._file_name(image_id, label_filename)[0])
        try:
            return super().save_label(image_id, label_filename, label_tag, label_info, *args, **kwargs)
        except ImageNotFoundException:
            raise HTTPException(status_code=404, detail=f"image '{image_id}' is not in the datastore") from None

    def remove_label(self, label_id: str, label_tag: str) -> None:
        self._checked(label_id=label_id, tag=label_tag)
        if not self.get_label_uri(label_id, label_tag):
            raise HTTPException(status_code=404, detail=f"no label '{label_id}' with tag '{label_tag}' in the datastore")
        return super().remove_label(label_id, label_tag)

    def get_image_uri(self, image_id: str) -> str:
        self._checked(image_id=image_id)
        return super().get_image_uri(image_id)

    def get_image_info(self, image_id: str):
        self._checked(image_id=image_id)
        return super().get_image_info(image_id)

    def update_image_info(self, image_id: str, info) -> None:
        self._checked(image_id=image_id)
        try:
            return super().update_image_info(image_id, info)
        except ImageNotFoundException:
            raise HTTPException(status_code=404, detail=f"image '{image_id}' is not in the datastore") from None

    def get_label_uri(self, label_id: str, label_tag: str, *args, **kwargs) -> str:
        self._checked(label_id=label_id, tag=label_tag)
        return super().get_label_uri(label_id, label_tag, *args, **kwargs)

    def get_label_info(self, label_id: str, label_tag: str):
        self._checked(label_id=label_id, tag=label_tag)
        return super().get_label_info(label_id, label_tag)

    def update_label_info(self, label_id: str, label_tag: str, info) -> None:
        self._checked(label_id=label_id, tag=label_tag)
        try:
            return super().update_label_info(label_id, label_tag, info)
        except LabelNotFoundException:
            raise HTTPException(status_code=404, detail=f"no label '{label_id}' with tag '{label_tag}' in the datastore") from None

    def get_labels_by_image_id(self, image_id: str):
        self._checked(image_id=image_id)
        return super().get_labels_by_image_id(image_id)

    def get_label_by_image_id(self, image_id: str, tag: str) -> str:
        self._checked(image_id=image_id, tag=tag)
        return super().get_label_by_image_id(image_id, tag)


class SafeSessions(Sessions):
    """MONAI Label's upload sessions (``PUT /session/``, ``session_id`` of infer) with checked ids.

    Session ids are joined into the sessions folder and a session is deleted with ``rmtree``: an id
    must be a safe name (422). An archive uploaded with ``uncompress=true`` is unpacked without
    letting any member out of its folder (tar members with ``..`` or absolute paths: 422).
    """

    def get_session(self, session_id: str, *args, **kwargs):
        with client_errors():
            safe_name("session id", session_id)
        return super().get_session(session_id, *args, **kwargs)

    def remove_session(self, session_id: str):
        with client_errors():
            safe_name("session id", session_id)
        return super().remove_session(session_id)

    def add_session(self, data_file: str, expiry: int = 0, uncompress: bool = False, session_id=None):
        with client_errors():
            if session_id is not None:
                safe_name("session id", session_id)
            if uncompress and not os.path.isdir(data_file):
                data_file = _unpack(data_file)
            check_session_images(data_file)
        return super().add_session(data_file, expiry, False, session_id)


def check_session_images(data: str) -> None:
    """A session's upload holds images the app can segment: a single image file, or a folder whose NIfTI images
    all pass :func:`~semisam_o1.volumes.check_image_file` (at least one).

    Raises:
        InputError: naming the file (by its upload name) and what is wrong.
    """
    files = [data] if not os.path.isdir(data) else sorted(
        os.path.join(root, f) for root, _, names in os.walk(data) for f in names if f.endswith((".nii", ".nii.gz")))
    if not files:
        raise InputError("session upload: no NIfTI image (.nii, .nii.gz) in it")
    for path in files:
        check_image_file(path, f"session file '{os.path.basename(path)}'")


def _unpack(archive: str) -> str:
    """A new temporary folder with the archive's members; tar members may not leave it (``filter="data"``)."""
    folder = tempfile.mkdtemp(prefix="session-")
    try:
        if tarfile.is_tarfile(archive):
            with tarfile.open(archive) as tar:
                tar.extractall(folder, filter="data")
        else:  # zip: the standard library drops '..' and absolute parts of member names
            shutil.unpack_archive(archive, folder, format="zip")
    except (tarfile.TarError, shutil.ReadError, zipfile.BadZipFile, ValueError) as e:
        shutil.rmtree(folder, ignore_errors=True)
        raise InputError(f"uploaded session archive: cannot be unpacked safely ({type(e).__name__}: {e})") from None
    return folder
