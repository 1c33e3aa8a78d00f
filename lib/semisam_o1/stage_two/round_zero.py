"""Round 0 of stage two, what round 1 trains on: stage one's labels of the pool, the pseudo-templates chosen among
them without ground truth (:func:`choose_pseudo_templates`), and their class borders snapped to the image's edges
(:mod:`~semisam_o1.stage_two.boundary`). Files go to the stage-two work folder (see :mod:`~semisam_o1.stage_two.rounds`).

Pseudo-templates (``pseudo_templates`` k > 0, default 1): :func:`choose_pseudo_templates` picks the k pool
images whose stage-one labels are most trusted among those that qualify (no class fell back to the
registration, feature consistency near the pool's median). Round 0 is stage one from the real and pseudo
templates unless that changes the pool's class volumes against the real templates' stage one by more than
``pseudo_templates_volume_change`` (0.10, as :data:`AUTO_VOLUME_CHANGE`; the measured change is in the
state); then, or when none qualifies, it is the real templates' stage one, and the state says why
(``pseudo_templates_note``).

Borders (``boundary="edges"``, default): stage one's labels sit about a voxel off the anatomy's edges
(its features are a few voxels apart); round 0 moves each class border to the image's intensity edges
within one voxel (:func:`~semisam_o1.stage_two.boundary.snap_to_edges`, a random walker, memory bounded by slabs)
and the state records the fraction of foreground voxels that changed (``boundary_changed``). The teacher
floor and ``agreement_with_stage_one`` compare against round 0, the snapped labels.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
from tqdm import tqdm

from semisam_o1.stage_one.normalize import normalize
from semisam_o1.stage_two.boundary import SNAP_SLAB_BYTES, snap_to_edges
from semisam_o1.stage_two.labels import soft_label, volume_change
from semisam_o1.templates import Template
from semisam_o1.volumes import (
    atomic_write,
    check_memory,
    label_array,
    load_image,
    read_geometry,
    save_array,
    save_label,
)

logger = logging.getLogger(__name__)


def stage_one_trust(prediction) -> float:
    """How far stage one's label of an image can be trusted, without ground truth: the mean, over its
    classes, of the Dice agreement between the feature vote and the registration-only warp (the safety
    floor's check, :func:`~semisam_o1.stage_one.predictor.registration_floor`), 0 for a class that fell back."""
    checks = list(prediction.floor.values())
    return float(np.mean([0.0 if f["fallback"] else f["agreement"] for f in checks])) if checks else 0.0


def trust_record(prediction) -> dict:
    """What :func:`choose_pseudo_templates` needs of one stage-one prediction (no ground truth):
    ``{"trust": stage_one_trust, "consistency": best feature consistency of its mappings (``None`` if
    not recorded), "fallback": class values the safety floor returned to the registration}``."""
    values = [m["consistency"] for m in prediction.mappings.values() if m["used"] and m["consistency"] == m["consistency"]]
    return {"trust": stage_one_trust(prediction), "consistency": max(values) if values else None,
            "fallback": prediction.fallback_values}


def choose_pseudo_templates(records: dict[str, dict], k: int, tolerance: float) -> tuple[list[str], dict[str, str]]:
    """The ``k`` pool images to promote to pseudo-templates, most trusted first, and why the others
    could not be chosen.

    An image qualifies when no class of its stage-one label fell back to the registration (its votes
    agree with the warp everywhere) and its feature consistency is not more than ``tolerance`` below the
    pool's median (an image unlike the template, e.g. a failed acquisition, maps onto unlike tissue:
    hippocampus 0.94 for real images against 0.52 for one with its voxels shuffled). Among those, the
    highest :func:`stage_one_trust` wins (ties: the first id).

    >>> records = {"a": {"trust": 0.8, "consistency": 0.94, "fallback": []},
    ...            "b": {"trust": 0.9, "consistency": 0.52, "fallback": []},
    ...            "c": {"trust": 0.7, "consistency": 0.93, "fallback": [2]},
    ...            "d": {"trust": 0.6, "consistency": 0.95, "fallback": []}}
    >>> chosen, excluded = choose_pseudo_templates(records, 2, 0.05)
    >>> chosen, sorted(excluded)
    (['a', 'd'], ['b', 'c'])
    """
    measured = [r["consistency"] for r in records.values() if r["consistency"] is not None]
    floor = float(np.median(measured)) - tolerance if measured else -np.inf
    excluded = {}
    for i, r in records.items():
        if r["fallback"]:
            excluded[i] = f"classes {r['fallback']} fell back to the registration"
        elif r["consistency"] is not None and r["consistency"] < floor:
            excluded[i] = f"feature consistency {r['consistency']:.3f} below the pool's median - {tolerance} ({floor:.3f})"
    eligible = sorted((i for i in records if i not in excluded), key=lambda i: (-records[i]["trust"], i))
    return eligible[:k], excluded


def _link_or_copy(src: Path, dst: Path) -> None:
    """``dst`` (an existing temporary file, replaced) as a hard link to ``src``, or a copy where links fail."""
    dst.unlink()
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


class RoundZero:
    """Round 0's steps of :class:`~semisam_o1.stage_two.rounds.StageTwo` (which mixes this class in: the methods
    use its ``work``, ``params``, ``stage_one`` and label helpers)."""

    def _starting_labels(self, templates, pool: dict[str, Path], n_classes: int, progress: bool) -> dict:
        """Round 0, the labels round 1 trains on; returns what the state records of it:
        ``pseudo_templates`` (the pseudo-templates used, ``[]`` when off or dropped), with them
        ``pseudo_templates_volume_change``, ``pseudo_templates_note`` when they were dropped and why, and
        ``boundary_changed`` (:meth:`_round_zero`).

        Without pseudo-templates: stage one from the real templates (``stage1/``). With ``k`` of them: stage one from the
        real templates first (``stage1/``), then the ``k`` pool images :func:`choose_pseudo_templates`
        picks (no ground truth) join the templates with those labels, and stage one runs again from real
        + pseudo templates for every pool image (``pseudo/``; an image is never its own template). Round 0
        is ``pseudo/`` unless the pseudo-templates changed the pool's class volumes against ``stage1/`` by
        more than ``params.pseudo_templates_volume_change`` (:func:`volume_change`, label-free; 0.10 like
        :data:`AUTO_VOLUME_CHANGE`) or none qualified; then it is ``stage1/``, the real templates alone. Pseudo-templates live in the work folder only: never
        written as ``final``. Every choice is a function of files in ``stage1/`` and ``pseudo/``, so a run
        resumed after a crash makes the same one.
        """
        k = min(self.params.pseudo_templates, len(pool) - 1)
        records = self._stage_one_labels(templates, pool, "stage1", n_classes, progress, score_mappings=k > 0)
        if k <= 0:
            return {"pseudo_templates": [], **self._round_zero("stage1", pool, progress)}
        chosen, excluded = choose_pseudo_templates(records, k, self.stage_one.params.mapping_tolerance)
        if not chosen:
            note = f"no pool image passed the pseudo-template criterion ({json.dumps(excluded)}): real templates only"
            logger.info(f"stage 2: {note}")
            return {"pseudo_templates": [], "pseudo_templates_note": note, **self._round_zero("stage1", pool, progress)}
        pseudo = [Template(i, pool[i], self.work / "stage1" / "labels" / f"{i}.nii.gz") for i in chosen]
        for i, path in tqdm(pool.items(), desc=f"stage 1 + {len(chosen)} pseudo-templates", disable=not progress, leave=False):
            others = [t for t in pseudo if t.image_id != i]
            if others:
                self._stage_one_labels([*templates, *others], {i: path}, "pseudo", n_classes, progress=False)
            else:  # the only pseudo-template is this image: its templates are the real ones, whose label stage1/ already holds
                for sub, name in (("labels", f"{i}.nii.gz"), ("probs", f"{i}.npy"), ("trust", f"{i}.json")):
                    target = self.work / "pseudo" / sub / name
                    if not target.exists():
                        atomic_write(target, lambda tmp, src=self.work / "stage1" / sub / name: _link_or_copy(src, tmp))
        change = volume_change(*(self._class_voxels(where, pool, n_classes) for where in ("pseudo", "stage1")))
        entries = [{"image": i, "trust": round(records[i]["trust"], 4), "consistency": records[i]["consistency"]} for i in chosen]
        logger.info(f"stage 2: pseudo-templates {chosen} (stage-one trust {[e['trust'] for e in entries]}); not eligible: {excluded}; "
                    f"they change the pool's class volumes by {change}")
        limit = self.params.pseudo_templates_volume_change
        if change is not None and change > limit:
            note = f"pseudo-templates {chosen} changed the pool's stage-one class volumes by {change:.3f} (more than {limit}): real templates only"
            logger.info(f"stage 2: {note}")
            return {"pseudo_templates": [], "pseudo_templates_volume_change": change, "pseudo_templates_note": note,
                    **self._round_zero("stage1", pool, progress)}
        return {"pseudo_templates": entries, "pseudo_templates_volume_change": change, **self._round_zero("pseudo", pool, progress)}

    def _class_voxels(self, where: str, pool: dict[str, Path], n_classes: int) -> dict[str, int]:
        """Voxels per foreground class of the stage-one labels in ``where``, summed over the pool (one image at a time)."""
        counts = np.zeros(n_classes, np.int64)
        for i in pool:
            label = label_array(self.work / where / "labels" / f"{i}.nii.gz")
            counts += np.bincount(np.asarray(label, np.int64).ravel().clip(0, n_classes - 1), minlength=n_classes)[:n_classes]
        return {str(c): int(counts[c]) for c in range(1, n_classes)}

    def _round_zero(self, where: str, pool: dict[str, Path], progress: bool) -> dict:
        """Round 0 from the stage-one labels, soft labels and trust records in ``where`` (images already done
        are kept). Trust records, and with ``boundary="none"`` labels and soft labels too, are hard links where
        the file system has them (no second copy on disk; every file is replaced, never changed in place, so
        the two names never diverge), else copies. With ``boundary="edges"`` each label and soft label is
        :func:`~semisam_o1.stage_two.boundary.snap_to_edges`'s, one image at a time, and ``borders/<id>.json``
        (``{"changed": voxels whose class changed, "foreground": stage one's foreground voxels}``, written last)
        marks the image done. Returns ``{"boundary_changed": fraction of the pool's stage-one foreground voxels
        whose class changed}`` (``None`` with ``"none"``), from those records: a resumed run reads no image."""
        changed = foreground = 0
        round_dir = self.labels_dir(0).parent
        for i, image_path in tqdm(pool.items(), desc=f"round 0: borders ({self.params.boundary})", disable=not progress, leave=False):
            source = {sub: self.work / where / sub / name for sub, name in (("labels", f"{i}.nii.gz"), ("probs", f"{i}.npy"), ("trust", f"{i}.json"))}
            if self.params.boundary == "edges":
                counts = round_dir / "borders" / f"{i}.json"  # written last: marks the image done
                if counts.exists():
                    record = json.loads(counts.read_text())
                else:
                    record = self._snap_borders(i, image_path, source)
                    atomic_write(counts, lambda tmp, record=record: tmp.write_text(json.dumps(record)))
                changed, foreground = changed + record["changed"], foreground + record["foreground"]
            for sub, src in source.items():
                target = round_dir / sub / src.name
                if not target.exists():
                    atomic_write(target, lambda tmp, src=src: _link_or_copy(src, tmp))
        return {"boundary_changed": round(changed / max(foreground, 1), 4) if self.params.boundary == "edges" else None}

    def _snap_borders(self, image_id: str, image_path: Path, source: dict[str, Path]) -> dict[str, int]:
        """Round 0's label and soft labels of one image: ``source``'s (``{"labels", "probs"}`` paths) with their
        borders snapped to the image's edges (:func:`~semisam_o1.stage_two.boundary.snap_to_edges`), soft labels first
        (snapped in a memory-mapped copy: only band voxels change). Returns ``{"changed": voxels whose class
        changed, "foreground": the source label's foreground voxels}``."""
        round_dir = self.labels_dir(0).parent
        image = load_image(image_path)
        # the image, its normalised copy, the label in and out, the seeds, masks; the slabs' graphs
        check_memory(f"{image.path}: round 0 borders", image.array.shape, 4 * 2 + 6, SNAP_SLAB_BYTES)
        before = self._read_label(source["labels"], image)
        normalised = normalize(image.array, self.stage_one.cache.modality)
        after = None

        def snap(tmp: Path) -> None:
            nonlocal after
            shutil.copyfile(source["probs"], tmp)
            probs = np.load(tmp, mmap_mode="r+")
            after = snap_to_edges(normalised, before, image.spacing, probs, self.params.boundary_beta)
            probs.flush()
            del probs

        atomic_write(round_dir / "probs" / f"{image_id}.npy", snap)
        save_label(after, image, round_dir / "labels" / f"{image_id}.nii.gz")
        return {"changed": int((after != before).sum()), "foreground": int((before > 0).sum())}

    def _stage_one_labels(self, templates, pool: dict[str, Path], where: str, n_classes: int, progress: bool,
                          score_mappings: bool = False) -> dict[str, dict]:
        """Stage one's label of every pool image into the work folder's ``where`` (``stage1`` or ``pseudo``):
        ``labels/<id>.nii.gz``, its :func:`trust_record` in ``trust/<id>.json`` and the soft
        label (its confidence on the label, the rest shared evenly) in ``probs/<id>.npy``. ``score_mappings``:
        the trust record holds the feature consistency even of a single mapping (the pseudo-template choice
        needs it). Images already done are skipped. Returns ``{image id: trust record}``."""
        folder = self.work / where
        records = {}
        for i, image_path in tqdm(pool.items(), desc="stage 1: propagate", disable=not progress, leave=False):
            path, probs, score = folder / "labels" / f"{i}.nii.gz", folder / "probs" / f"{i}.npy", folder / "trust" / f"{i}.json"
            if not (path.exists() and probs.exists() and score.exists()):
                prediction = self.stage_one.predict(image_path, templates, score_mappings=score_mappings)
                save_array(probs, soft_label(prediction.label, prediction.confidence, n_classes))
                save_label(prediction.label, read_geometry(image_path), path)
                atomic_write(score, lambda tmp: tmp.write_text(json.dumps(trust_record(prediction))))
            records[i] = json.loads(score.read_text())
        return records
