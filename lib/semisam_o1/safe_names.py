"""The one rule for names a client sends that become file or folder names.

Image ids, label ids, label tags, session ids and the names of uploaded files end up as paths
(``<studies>/<id>.nii.gz``, ``<studies>/labels/<tag>/<id>.nii.gz``). :func:`safe_name` accepts only

- 1 to :data:`MAX_NAME` characters from ``A-Z a-z 0-9 . _ -``,
- not starting with ``.`` (no ``.``, ``..``, hidden files) and without ``..`` anywhere,

so a name can never hold a separator (``/``, ``\\``), a NUL byte, an absolute path or a parent
reference, whatever the client encoded. DICOM series UIDs (the ids of a DICOMweb datastore) must
also follow the DICOM UID grammar (:func:`dicom_uid`). Both raise :class:`UnsafeNameError`, an
:class:`~semisam_o1.volumes.InputError` whose message names the parameter and shows the value.
"""

from __future__ import annotations

import re

from semisam_o1.volumes import InputError

#: Longest accepted name (ids and tags; file names are the id plus its extension).
MAX_NAME = 128
#: Longest DICOM UID (PS3.5 section 9.1).
MAX_UID = 64
_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")  # leading zeros tolerated: some archives write them
RULE = f"1-{MAX_NAME} letters, digits, '.', '_' or '-', not starting with '.' and without '..'"


class UnsafeNameError(InputError):
    """A client's name that must not become a file or folder name."""


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:77]}..."


def is_safe_name(value) -> bool:
    """Whether :func:`safe_name` accepts ``value``."""
    return isinstance(value, str) and len(value) <= MAX_NAME and bool(_NAME.fullmatch(value)) and ".." not in value


def safe_name(kind: str, value) -> str:
    """``value`` unchanged if it may become a file or folder name, else :class:`UnsafeNameError`.

    Args:
        kind: what the value is, as the client knows it (e.g. ``"image id"``, ``"label tag"``): the
            error message starts with it.
    """
    if not is_safe_name(value):
        raise UnsafeNameError(f"{kind} {_shown(value)} is not allowed: use {RULE}")
    return value


def dicom_uid(kind: str, value) -> str:
    """``value`` unchanged if it is a DICOM UID (dot-separated runs of digits, at most 64 characters), else
    :class:`UnsafeNameError`."""
    if not (isinstance(value, str) and len(value) <= MAX_UID and _UID.fullmatch(value)):
        raise UnsafeNameError(f"{kind} {_shown(value)} is not a DICOM UID (digits and '.', at most {MAX_UID} characters)")
    return value


def result_suffix(request: dict) -> str:
    """The extension of the result file an infer request asks for (``result_extension``; default ``.nii.gz``;
    Slicer sends ``.nrrd``), checked to make a plain file name.

    >>> result_suffix({"result_extension": "nrrd"}), result_suffix({})
    ('.nrrd', '.nii.gz')

    Raises:
        UnsafeNameError: the extension would not make a plain file name (e.g. holds a separator).
    """
    suffix = str(request.get("result_extension") or ".nii.gz")
    suffix = suffix if suffix.startswith(".") else f".{suffix}"
    safe_name("result_extension", f"result{suffix}")
    return suffix


#: an absolute file path in a message: ``/a/b/c.nii.gz`` (not a URL's ``//host/...``)
_PATH = re.compile(r"(?<![\w:/.])(/[\w.\-]+)+/([\w.\-]+)")


def public(message: str) -> str:
    """``message`` without the server's file paths: each absolute path becomes its file name (a client knows its
    files by their names and ids; where the server keeps them is not its business).

    >>> public("/srv/studies/.semisam/x/case_7.nii.gz: not a readable NIfTI image (tmp /tmp/tmpab12.nii.gz)")
    'case_7.nii.gz: not a readable NIfTI image (tmp tmpab12.nii.gz)'
    >>> public("DICOMweb server http://127.0.0.1:8042/dicom-web is unreachable")
    'DICOMweb server http://127.0.0.1:8042/dicom-web is unreachable'
    """
    return _PATH.sub(lambda m: m.group(2), message)
