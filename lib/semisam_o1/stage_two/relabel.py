"""Stage two's relabelling step, after a round's network is trained: the pool's new labels.

:class:`Relabel` is mixed into :class:`~semisam_o1.stage_two.rounds.StageTwo` and uses its ``work``, ``params``,
``stage_one``, the label and soft-label files of earlier rounds (``_label_array``, ``probs_path``) and the published
model's prediction (``_predict``). For round ``r`` it writes into ``round_<r>/`` (the layout is in
:mod:`~semisam_o1.stage_two.rounds`):

1. :meth:`Relabel._predict_round`, one pool image at a time: the network's soft labels with voxel-wise
   uncertainty, ensembled with round ``r - 1``'s and round 0's (:func:`~semisam_o1.stage_two.labels.ensemble_weights`),
   saved as ``probs/``; their entropy (``uncertainty/``); the hard labels that replace round ``r - 1``'s only where
   the soft label is confident (``predicted/``, :func:`~semisam_o1.stage_two.labels.confident_replacement`); and
   the label-free signals the round's stats record;
2. :meth:`Relabel._refine`: the feature-space refinement of uncertain voxels (``refinement`` ``voxel`` or
   ``volume``; ``none`` passes the predicted labels on); ``voxel`` also compares positions in the first template's
   frame (:meth:`Relabel._positions`, kept in the work folder's ``positions/``);
3. :meth:`Relabel._save_refined`, per image: with ``teacher_floor``, a class that drifted from round 0's label
   beyond the safety floor's bounds returns to it; then ``labels/<id>.nii.gz`` and ``labels/<id>.npy``, the labels
   round ``r + 1`` trains on.

No step holds the pool: each image's arrays are written before the next is read, and the refinement reads the
predicted labels and uncertainty back memory-mapped.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from semisam_o1.evaluation import class_dice
from semisam_o1.stage_one.feature_cache import FeatureGrid
from semisam_o1.stage_one.predictor import registration_floor
from semisam_o1.stage_two.labels import (
    confident_replacement,
    ensemble_weights,
    resolve_replace_confidence,
    volume_change,
)
from semisam_o1.stage_two.network import entropy
from semisam_o1.stage_two.params import AUTO_REPLACE_CONFIDENCE
from semisam_o1.stage_two.refinement import RefineCase, refine_volumes, refine_voxels
from semisam_o1.templates import Template
from semisam_o1.volumes import Volume, atomic_write, load_array, load_image, save_array, save_label


class Relabel:
    """A round's new pool labels from its trained network (see the module docstring); mixed into
    :class:`~semisam_o1.stage_two.rounds.StageTwo`."""

    def _predict_round(self, net: torch.nn.Module, round_: int, ensemble: str, first_change: float | None, pool: dict[str, Path],
                       grids: dict[str, Volume], n_classes: int, round_dir: Path,
                       progress: bool) -> tuple[list[float], list[float], dict[str, list[float]], dict, float]:
        """Round ``round_``'s soft labels of every pool image, one image at a time: the network's softmax,
        ensembled (``ensemble``, resolved) with the previous soft labels, saved as ``probs``; their entropy
        (``uncertainty/``) and the hard labels that replace the previous ones where confident
        (``predicted/``, :func:`confident_replacement` at :func:`resolve_replace_confidence`'s threshold, from
        ``first_change``, round 1's ``network_volume_change``: ``None`` in round 1, where ``auto`` writes both
        candidates and keeps the one this round's pool-wide volume change picks), the refinement's inputs.

        Returns:
            per image, the mean entropy of the soft labels and the fraction of voxels that kept their previous
            label; the label-free signals ``{"network_entropy", "agreement_with_stage_one"}``, one value per image;
            the pool's voxels per foreground class, ``{"network": {class: n}, "labels": {class: n}}``, of
            the network's argmax and of the labels it trained on (round ``round_ - 1``'s); and the threshold used.
        """
        mean_entropy, criteria = [], {"network_entropy": [], "agreement_with_stage_one": []}
        counts = {"network": np.zeros(n_classes, np.int64), "labels": np.zeros(n_classes, np.int64)}
        w_net, w_prev, w_stage1 = ensemble_weights(ensemble, round_)
        decided = self.params.replace_confidence is not None or round_ > 1
        thresholds = ([resolve_replace_confidence(self.params.replace_confidence, first_change)] if decided
                      else [AUTO_REPLACE_CONFIDENCE, 0.0])  # auto in round 1: decided by this round's network
        kept = {t: [] for t in thresholds}
        for i, path in tqdm(pool.items(), desc=f"round {round_}: predict", disable=not progress, leave=False):
            prob, network_entropy = self._predict(net, load_image(path), self.params.mc_samples)
            network_label = prob.argmax(0)
            previous = self._label_array(round_ - 1, i, grids[i])
            criteria["network_entropy"].append(float(network_entropy.mean()))
            criteria["agreement_with_stage_one"].append(float(class_dice(network_label, self._label_array(0, i, grids[i]), n_classes).mean()))
            counts["network"] += np.bincount(network_label.ravel(), minlength=n_classes)[:n_classes]
            counts["labels"] += np.bincount(np.asarray(previous).ravel(), minlength=n_classes)[:n_classes]
            del network_entropy, network_label
            if w_net < 1:
                prob *= w_net
                for r, w in ((round_ - 1, w_prev), (0, w_stage1)):
                    if w > 0:
                        other = load_array(self.probs_path(r, i))
                        for c in range(len(prob)):  # class by class: one float32 (D, H, W) temporary
                            prob[c] += w * other[c].astype(np.float32)
                        del other
            self._save_probs(prob, round_, i)
            uncertainty = entropy(prob)
            mean_entropy.append(float(uncertainty.mean()))
            save_label(uncertainty, grids[i], round_dir / "uncertainty" / f"{i}.nii.gz", dtype=np.float32)
            save_array(round_dir / "uncertainty" / f"{i}.npy", uncertainty.astype(np.float16))
            for n, t in enumerate(thresholds):
                predicted, keep = confident_replacement(prob, previous, t)
                kept[t].append(float(keep.mean()))
                save_array(round_dir / f"predicted-{n}" / f"{i}.npy", predicted)
                del predicted, keep
            del prob, uncertainty, previous
        volumes = {k: {str(c): int(v[c]) for c in range(1, n_classes)} for k, v in counts.items()}
        threshold = thresholds[0] if decided else resolve_replace_confidence(None, volume_change(volumes["network"], volumes["labels"]))
        shutil.rmtree(round_dir / "predicted", ignore_errors=True)  # a crashed attempt's
        for n, t in enumerate(thresholds):
            candidate = round_dir / f"predicted-{n}"
            if t == threshold and candidate.exists():
                candidate.rename(round_dir / "predicted")
            else:
                shutil.rmtree(candidate, ignore_errors=True)
        return mean_entropy, kept[threshold], criteria, volumes, threshold

    def _refine(self, finals, final_labels, pool: dict[str, Path], round_dir: Path, positions, grids: dict[str, Volume]) -> dict:
        """Refine round ``round_dir``'s predicted labels (read from disk) and write the round's labels."""
        round_ = int(round_dir.name.split("_")[1])
        ids = list(pool)
        predicted = {i: load_array(round_dir / "predicted" / f"{i}.npy") for i in ids}
        if self.params.refinement == "none":
            for i in ids:
                self._save_refined(round_, i, predicted[i], grids[i])
            return {"uncertain_voxels": 0, "changed_per_class": {}}
        cache = self.stage_one.cache
        where = (lambda i: positions[i]) if positions else (lambda i: None)
        cases = [RefineCase(cache.get_or_compute(img), lab, np.zeros(lab.shape, np.float16), True, where(t.image_id))
                 for (img, t), lab in zip(finals, final_labels)]
        features = lambda i: cache.get(grids[i]) or cache.get_or_compute(load_image(pool[i]))  # noqa: E731 (stage one cached them)
        cases += [RefineCase(features(i), predicted[i],
                             load_array(round_dir / "uncertainty" / f"{i}.npy"), position=where(i)) for i in ids]
        sink = lambda n, label: self._save_refined(round_, ids[n - len(finals)], label, grids[ids[n - len(finals)]])  # noqa: E731
        if self.params.refinement == "voxel":
            result = refine_voxels(cases, self.params.refine, sink=sink)
        else:
            result = refine_volumes(cases, sink=sink)
        return {
            "uncertainty_threshold": result.threshold,
            "uncertain_voxels": result.uncertain_voxels,
            "changed_per_class": {str(k): v for k, v in result.changed_per_class.items()},
        }

    def _save_refined(self, round_: int, image_id: str, label: np.ndarray, grid: Volume) -> None:
        """Write round ``round_``'s label of ``image_id``; with ``teacher_floor``, each class that drifted
        from stage one's label beyond the safety floor's bounds first returns to stage one's voxels."""
        teacher = self._label_array(0, image_id, grid)
        if self.params.teacher_floor:
            classes = sorted(set(np.unique(teacher).tolist()) - {0})
            label, floor = registration_floor(np.asarray(label, np.uint8), np.asarray(teacher), classes, self.stage_one.floor)
            for c, check in floor.items():
                if check["fallback"]:
                    self._returned[str(c)] = self._returned.get(str(c), 0) + 1
        self._agreement.append(float(class_dice(np.asarray(label), teacher, max(self._n_classes, 2)).mean()))
        save_label(label, grid, self.labels_dir(round_) / f"{image_id}.nii.gz")
        save_array(self.labels_dir(round_) / f"{image_id}.npy", np.asarray(label, np.uint8))

    def _positions(self, templates: list[Template], pool: dict[str, Path]) -> dict[str, FeatureGrid] | None:
        """Every voxel's index in the first template's grid (the refinement's common frame), per image id
        and template image id, kept on disk (``positions/<id>.npy``) and memory-mapped; ``None`` when the
        refinement does not use positions."""
        if self.params.refinement != "voxel" or self.params.refine.position_weight == 0:
            return None
        frame = templates[0].image_path
        paths = {**{t.image_id: t.image_path for t in templates}, **pool}
        out = {}
        for i, path in paths.items():
            values, meta = self.work / "positions" / f"{i}.npy", self.work / "positions" / f"{i}.json"
            if not meta.exists():
                grid = self.stage_one.frame_positions(path, frame)
                save_array(values, grid.values)
                atomic_write(meta, lambda tmp: tmp.write_text(json.dumps({"stride": grid.stride, "shape": grid.shape})))
            info = json.loads(meta.read_text())
            out[i] = FeatureGrid(load_array(values), tuple(info["stride"]), tuple(info["shape"]))
        return out
