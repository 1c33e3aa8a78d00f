"""Templates: the images whose label a clinician saved as ``final``, and the label map they define.

A template is any datastore image with a ``final`` label. The label map (name -> integer value) is
the union of the values found in the template labels and those named by ``--conf labels``; a value
without a name is called ``label_<value>``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from monailabel.interfaces.datastore import Datastore, DefaultLabelTag

from semisam_o1.volumes import InputError, label_array

logger = logging.getLogger(__name__)

#: Tag of machine-made labels; ``final`` (MONAI Label's ``DefaultLabelTag.FINAL``) is reserved for clinicians.
PSEUDO_TAG = "pseudo"

#: The stage-one model's name (registration-guided feature label fusion, or the paper's prototypes).
STAGE_ONE_MODEL = "semisam_stage_one"



@dataclass(frozen=True)
class Template:
    """One labelled image of the datastore."""

    image_id: str
    image_path: Path
    label_path: Path


def find_templates(datastore: Datastore) -> list[Template]:
    """All images with a ``final`` label, sorted by image id."""
    found = []
    for image_id in sorted(datastore.get_labeled_images(DefaultLabelTag.FINAL)):
        label_id = datastore.get_label_by_image_id(image_id, DefaultLabelTag.FINAL)
        found.append(
            Template(
                image_id=image_id,
                image_path=Path(datastore.get_image_uri(image_id)),
                label_path=Path(datastore.get_label_uri(label_id, DefaultLabelTag.FINAL)),
            )
        )
    return found


_values_cache: dict[tuple[str, int, int], tuple[int, ...]] = {}
_unreadable: set[tuple[str, int, int]] = set()


def label_values(path: Path) -> tuple[int, ...]:
    """Sorted non-zero integer values of a label file, NIfTI or NRRD (cached by path, size and mtime)."""
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _values_cache:
        _values_cache[key] = tuple(int(v) for v in np.unique(label_array(path)) if v != 0)
    return _values_cache[key]


def label_map(templates: list[Template], names: dict[str, int]) -> dict[str, int]:
    """``{name: value}`` for every value present in the templates, ordered by value.

    Args:
        templates: the datastore's templates (:func:`find_templates`).
        names: ``--conf labels``; its values are listed even before a template has them, so a
            clinician can annotate the first template with the right names.

    A template whose label file cannot be read (corrupt, truncated) is skipped with a warning naming
    the file, once per version of the file; the file itself is left as it is.
    """
    found = set(names.values())
    for t in templates:
        try:
            found |= set(label_values(t.label_path))
        except (InputError, OSError) as e:
            stat = t.label_path.stat() if t.label_path.exists() else None
            key = (str(t.label_path), stat.st_size if stat else -1, stat.st_mtime_ns if stat else -1)
            if key not in _unreadable:
                _unreadable.add(key)
                logger.warning(f"template '{t.image_id}' skipped in the label map: its final label {t.label_path} cannot be read ({e})")
    values = sorted(found)
    by_value = {v: n for n, v in names.items()}
    return {by_value.get(v, f"label_{v}"): v for v in values}
