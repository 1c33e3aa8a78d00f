"""What each further label bought, measured on the images clinicians label: the O1 -> Ok curve of a datastore.

When a clinician saves a ``final`` label for an image that had a ``pseudo`` label (stage one's, or the
published stage-two network's), that pseudo-label was made from the labels saved before it. Its Dice
against the clinician's label is an honest measurement of the pool's accuracy with that many labels,
on an image nobody had labelled: no ground truth is needed and nothing is recomputed. This module
guarantees:

- :func:`record`: one entry per image (the first final label of an image counts; a later correction of the
  same image does not add a point), appended to ``<work>/.semisam/label_curve.json``:
  ``{"image", "labels_before", "model", "dice", "dice_per_class", "ts"}``. The clinician's label is only read.
- :func:`summary`: the curve ``points`` (``{"labels", "dice", "images"}``: mean Dice of the pseudo-labels made
  from ``labels`` labels, over the images measured at that count) and ``expected_gain_next_label`` (Dice per
  label between the last two label counts measured; ``None`` with a reason before there are two). One image
  per point is noisy: the count of images behind each point is part of the answer.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from semisam_o1.evaluation import scores
from semisam_o1.volumes import load_image, load_label

FILE = "label_curve.json"


def _path(work: Path) -> Path:
    return Path(work) / ".semisam" / FILE


def entries(work: Path) -> list[dict]:
    """The recorded entries (``[]`` when none)."""
    path = _path(work)
    return json.loads(path.read_text()) if path.exists() else []


def record(work: Path, image_id: str, image_path: Path, pseudo_path: Path, final_path: Path, labels_before: int, model: str,
           names: dict[str, int]) -> dict | None:
    """Score the image's pseudo-label (made from ``labels_before`` labels by ``model``) against its new final label.

    Returns the entry written, or ``None`` when the image already has one.
    """
    done = entries(work)
    if any(e["image"] == image_id for e in done):
        return None
    image = load_image(image_path)
    per_class = scores(load_label(pseudo_path, image, require_foreground=False), load_label(final_path, image, require_foreground=False), names)
    dice = {name: round(float(s["dice"]), 4) for name, s in per_class.items()}
    entry = {"image": image_id, "labels_before": int(labels_before), "model": model, "dice": round(float(np.mean(list(dice.values()))), 4),
             "dice_per_class": dice, "ts": int(time.time())}
    path = _path(work)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{FILE}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps([*done, entry], indent=2))
    os.replace(tmp, path)
    return entry


def record_saved_label(datastore, work: Path, image_id: str, names: dict[str, int]) -> dict | None:
    """:func:`record` for an image whose ``final`` label was just saved in a MONAI Label ``datastore``, if it had a
    ``pseudo`` label. Labels before: the label info's ``templates`` (stage one), else the final labels now less this one."""
    pseudo_id = datastore.get_label_by_image_id(image_id, "pseudo")
    final_id = datastore.get_label_by_image_id(image_id, "final")
    if not pseudo_id or not final_id:
        return None
    info = datastore.get_label_info(pseudo_id, "pseudo") or {}
    before = len(info["templates"]) if info.get("templates") else len(datastore.get_labeled_images("final")) - 1
    if before < 1:
        return None
    return record(work, image_id, Path(datastore.get_image_uri(image_id)), Path(datastore.get_label_uri(pseudo_id, "pseudo")),
                  Path(datastore.get_label_uri(final_id, "final")), before, info.get("model", "unknown"), names)


def summary(work: Path) -> dict:
    """``{"points": [{"labels", "dice", "images"}], "expected_gain_next_label": float | None, "why": str}``.

    >>> import tempfile; w = Path(tempfile.mkdtemp()); (w / ".semisam").mkdir()
    >>> _ = _path(w).write_text(json.dumps([{"image": "a", "labels_before": 1, "dice": 0.70}, {"image": "b", "labels_before": 2, "dice": 0.76},
    ...                                     {"image": "c", "labels_before": 2, "dice": 0.78}]))
    >>> summary(w)["points"], summary(w)["expected_gain_next_label"]
    ([{'labels': 1, 'dice': 0.7, 'images': 1}, {'labels': 2, 'dice': 0.77, 'images': 2}], 0.07)
    """
    by_count: dict[int, list[float]] = {}
    for e in entries(work):
        by_count.setdefault(e["labels_before"], []).append(e["dice"])
    points = [{"labels": k, "dice": round(float(np.mean(v)), 4), "images": len(v)} for k, v in sorted(by_count.items())]
    if len(points) < 2:
        return {"points": points, "expected_gain_next_label": None,
                "why": "measured when a clinician labels an image that had a pseudo-label: needs two label counts measured"}
    a, b = points[-2], points[-1]
    gain = round((b["dice"] - a["dice"]) / (b["labels"] - a["labels"]), 4)
    return {"points": points, "expected_gain_next_label": gain,
            "why": f"Dice per label between {a['labels']} and {b['labels']} labels, on the images labelled since ({a['images']} and {b['images']})"}
