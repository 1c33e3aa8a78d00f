"""Stage two: rounds of train (round 1 from scratch, later rounds on from the previous round's network at
``warm_lr`` x the learning rate: ``warm_start``) -> predict with uncertainty -> (optional) feature-space refinement.

Work folder ``<studies>/.semisam/stage2/`` (plans and results on disk, nnU-Net style)::

    state.json                  params, finished rounds and their stats (resume point)
    stage1/labels/<id>.nii.gz   stage one from the real templates (with pseudo-templates, they are chosen
                                from these: their template labels); also ``probs/`` (soft labels
                                (C, D, H, W) float16 from its confidence), ``trust/<id>.json`` (:func:`stage_one_trust`)
    pseudo/labels/<id>.nii.gz   with pseudo-templates only: stage one from real + pseudo templates (also
                                ``probs/``, ``trust/``)
    round_0/labels/<id>.nii.gz  the starting point, what round 1 trains on: ``stage1/`` or ``pseudo/``, with
                                ``boundary="edges"`` (default) their borders snapped to the image's
                                edges (:func:`~semisam_o1.stage_two.boundary.snap_to_edges`; ``probs/`` likewise;
                                ``borders/<id>.json`` counts the voxels that changed), else hard links
                                to them; ``trust/`` always links
    round_<r>/model.pt          the network trained in round r
    round_<r>/probs/<id>.npy    soft pseudo-labels after round r (see below)
    round_<r>/uncertainty/<id>.nii.gz   entropy (nats) of those soft pseudo-labels
    round_<r>/labels/<id>.nii.gz   refined hard pseudo-labels after round r (what round r+1 trains on;
                                   also as ``<id>.npy`` uint8, memory-mapped by training)
    images/<id>.npy             each pool image normalised, float32 (training reads patches from it)
    positions/<id>.npy, .json   voxel positions in the first template's grid (the refinement's frame)
    model.pt                    the latest finished round's network (what the infer task serves)

This module holds the loop and its state: what a run depends on, resuming, training each round, committing it and
choosing the round to publish. Round 0 is :mod:`~semisam_o1.stage_two.round_zero`'s; a round's new labels after
training (prediction with uncertainty, confident replacement, refinement, teacher floor) are
:mod:`~semisam_o1.stage_two.relabel`'s and follow the pure rules of :mod:`~semisam_o1.stage_two.labels`; the
network's grid and the served model are :mod:`~semisam_o1.stage_two.published`'s.

Memory: no step holds the pool. Training reads patches from memory-mapped arrays
(:class:`~semisam_o1.stage_two.network.PatchSampler`); prediction holds one image at a time and writes its
soft labels, entropy and argmax before the next; the refinement reads those back memory-mapped and
writes each refined label as it is made. Peak memory grows with the largest volume, not the pool.

A round is committed by writing ``state.json`` last: a run killed mid-round (even ``kill -9``)
restarts that round, and everything of earlier rounds stays valid. Every file is written to a hidden
temporary name and renamed (``atomic_write``), so no half-written file has a name anything reads;
the temporary files a killed run left are deleted when the next run starts. ``state.json`` also records the run's inputs (templates
with their label hashes, the pool, the params, stage one's settings): when a clinician saves a new ``final`` label, the
pool changes or stage one is set differently (e.g. ``fusion_decision``), the next run starts again from round 0 instead of resuming (the published
``model.pt`` keeps serving until the new run's first round replaces it). ``final`` labels are read,
never written.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm import tqdm

from semisam_o1.choices import BOUNDARIES, ENSEMBLES, PUBLISH, REFINEMENTS
from semisam_o1.evaluation import class_dice
from semisam_o1.stage_one.normalize import normalize
from semisam_o1.stage_one.plan import shrink_factors
from semisam_o1.stage_one.predictor import NoTemplateError, StageOne
from semisam_o1.stage_two.labels import choose_round, resolve_ensemble, training_weights, volume_change
from semisam_o1.stage_two.network import image_to_grid, label_to_grid, load_network, save_network
from semisam_o1.stage_two.params import StageTwoParams, TrainParams
from semisam_o1.stage_two.patches import mirror_axes, slice_axis
from semisam_o1.stage_two.published import PublishedModel
from semisam_o1.stage_two.relabel import Relabel
from semisam_o1.stage_two.round_zero import RoundZero
from semisam_o1.stage_two.training import train_network
from semisam_o1.templates import Template
from semisam_o1.volumes import (
    Volume,
    atomic_write,
    load_array,
    load_image,
    load_label,
    read_geometry,
    save_array,
    sha256,
)

logger = logging.getLogger(__name__)


@dataclass
class Progress:
    """What a caller sees while stage two runs (MONAI Label train stats, tqdm)."""

    round: int = 0
    rounds: int = 0
    phase: str = ""
    iteration: int = 0
    iterations: int = 0
    loss: float | None = None
    history: list = field(default_factory=list)


class StageTwo(RoundZero, Relabel, PublishedModel):
    def __init__(self, studies: Path, stage_one: StageOne, params: StageTwoParams = StageTwoParams(), work: Path | None = None):
        """``work`` defaults to ``<studies>/.semisam/stage2`` (benchmarks keep variants apart with it)."""
        if params.refinement not in REFINEMENTS:
            raise ValueError(f"refinement must be one of {REFINEMENTS}, got '{params.refinement}'")
        if params.ensemble not in ENSEMBLES:
            raise ValueError(f"ensemble must be one of {ENSEMBLES}, got '{params.ensemble}'")
        if params.publish not in PUBLISH:
            raise ValueError(f"publish must be one of {PUBLISH}, got '{params.publish}'")
        if params.boundary not in BOUNDARIES:
            raise ValueError(f"boundary must be one of {BOUNDARIES}, got '{params.boundary}'")
        self.studies = Path(studies)
        self.stage_one = stage_one
        if params.train.iterations is None:  # --conf iterations auto: the datastore's plan
            params = replace(params, train=replace(params.train, iterations=stage_one.cache.plan.network_iterations))
        self.params = params
        self.work = Path(work) if work else self.studies / ".semisam" / "stage2"
        self.progress = Progress(rounds=params.rounds)
        self._returned: dict[str, int] = {}  # this round: {class: images whose class returned to stage one's} (teacher floor)
        self._agreement: list[float] = []  # this round: each refined label's mean class Dice against stage one's
        self._n_classes = 0

    @property
    def device(self) -> str:
        """Where the network trains and predicts: the stage-one cache's device (``--conf device``)."""
        return self.stage_one.cache.device

    # ----------------------------------------------------------------- state
    def state(self) -> dict:
        path = self.work / "state.json"
        return json.loads(path.read_text()) if path.exists() else {"rounds": []}

    def _commit(self, state: dict) -> None:
        atomic_write(self.work / "state.json", lambda tmp: tmp.write_text(json.dumps(state, indent=2)))

    def labels_dir(self, round_: int) -> Path:
        return self.work / f"round_{round_}" / "labels"

    def probs_path(self, round_: int, image_id: str) -> Path:
        return self.work / f"round_{round_}" / "probs" / f"{image_id}.npy"

    def _save_probs(self, prob: np.ndarray, round_: int, image_id: str) -> None:
        atomic_write(self.probs_path(round_, image_id), lambda tmp: np.save(tmp, prob.astype(np.float16)))

    @property
    def model_path(self) -> Path:
        return self.work / "model.pt"

    # ----------------------------------------------------------------- run
    def run(self, templates: list[Template], pool: dict[str, Path], progress: bool = False,
            on_progress: Callable[[Progress], None] | None = None) -> dict:
        """Run (or resume) all rounds.

        Args:
            templates: images with ``final`` labels (ground truth, never changed).
            pool: ``{image_id: image path}`` of the unlabelled images to pseudo-label.
        Returns:
            The final state (``rounds``: per-round stats).
        """
        if not templates:
            raise NoTemplateError("stage two needs a template: save a 'final' label for at least one image first")
        notify = on_progress or (lambda p: None)
        self._remove_interrupted_writes()
        inputs = self._inputs(templates, pool)
        state = self.state()
        if state["rounds"] and state.get("inputs") != inputs:
            logger.info("stage 2: templates, pool, params or stage one's settings changed since the last run; starting again from round 0")
            self._reset()
            state = self.state()
        if len(state["rounds"]) >= self.params.rounds or state.get("stopped_early"):
            return state
        grids = {i: read_geometry(p) for i, p in pool.items()}  # each image's grid; voxels are read when needed
        finals = [(load_image(t.image_path), t) for t in templates]
        final_labels = [load_label(t.label_path, img, allowed=self.stage_one.label_values).astype(np.uint8) for img, t in finals]
        n_classes = 1 + max(int(lab.max()) for lab in final_labels)

        round_zero = self._starting_labels(templates, pool, n_classes, progress)
        self._write_images(pool, progress)
        positions = self._positions(templates, pool)
        for round_ in range(len(state["rounds"]) + 1, self.params.rounds + 1):
            start = time.perf_counter()
            self.progress.round, self.progress.phase = round_, "train"
            notify(self.progress)
            current = {i: self._label_array(round_ - 1, i, grids[i]) for i in pool}
            train = self.train_params(final_labels, n_classes, finals[0][0])
            init = None
            if self.params.warm_start and round_ > 1:
                init = load_network(self.work / f"round_{round_ - 1}" / "model.pt").state_dict()
                train = replace(train, learning_rate=train.learning_rate * self.params.warm_lr)
            net = self._train(finals, final_labels, current, grids, n_classes, train, progress, notify, init)
            round_dir = self.work / f"round_{round_}"
            save_network(net, n_classes, round_dir / "model.pt", train, self.params.network_voxels)

            self.progress.phase = "predict"
            notify(self.progress)
            ensemble = resolve_ensemble(self.params.ensemble, state["rounds"], self.params.warm_start)
            first_change = state["rounds"][0].get("network_volume_change") if state["rounds"] else None
            mean_entropy, kept, criteria, volumes, threshold = self._predict_round(net, round_, ensemble, first_change, pool, grids, n_classes,
                                                                                   round_dir, progress)

            self.progress.phase = "refine"
            notify(self.progress)
            self._returned, self._agreement, self._n_classes = {}, [], n_classes
            refine_stats = self._refine(finals, final_labels, pool, round_dir, positions, grids)
            for scratch in (round_dir / "predicted", *(round_dir / "uncertainty").glob("*.npy")):  # inputs of the refinement only
                shutil.rmtree(scratch) if scratch.is_dir() else scratch.unlink()
            stats = {
                "round": round_,
                "seconds": round(time.perf_counter() - start, 1),
                "final_loss": self.progress.loss,
                "mean_entropy": float(np.mean(mean_entropy)),
                "replace_confidence": threshold,  # resolved (resolve_replace_confidence)
                "kept_previous_fraction": float(np.mean(kept)),  # voxels whose new label was not confident enough
                "returned_to_stage_one": dict(self._returned),  # {class: images} (teacher floor)
                "ensemble": ensemble,
                # the network's class volumes on the pool against its training labels' (label-free)
                "network_volume_ratio": {c: round(volumes["network"][c] / n, 4) for c, n in volumes["labels"].items() if n},
                "network_volume_change": volume_change(volumes["network"], volumes["labels"]),
                # label-free signals of the round network's quality (recorded to find which predicts Dice)
                **{name: float(np.mean(values)) for name, values in criteria.items()},
                "labels_agreement_with_stage_one": float(np.mean(self._agreement)),
                "template_dice": float(np.mean([class_dice(self.predict(net, img)[0], lab, n_classes).mean()
                                                for (img, _), lab in zip(finals, final_labels)])),
                **refine_stats,
            }
            rounds = [*state["rounds"], stats]
            published = choose_round(rounds, self.params.publish)
            atomic_write(self.model_path, lambda tmp: shutil.copyfile(self.work / f"round_{published['round']}" / "model.pt", tmp))
            state = {"inputs": inputs, "n_classes": n_classes, "rounds": rounds, "published": published, **round_zero}
            if published["round"] < round_ < self.params.rounds:  # this round did not improve on the best: stop
                state["stopped_early"] = f"round {round_} was not better than round {published['round']} by {published['by']}"
            self._commit(state)
            self.progress.history.append(stats)
            notify(self.progress)
            logger.info(f"stage 2 round {round_}/{self.params.rounds}: {json.dumps(stats)}; published: round {published['round']} ({published['reason']})")
            if state.get("stopped_early"):
                logger.info(f"stage 2 stops early: {state['stopped_early']}")
                break
        return state

    # ----------------------------------------------------------------- steps
    def _inputs(self, templates: list[Template], pool: dict[str, Path]) -> dict:
        """What a run depends on; a committed state with other inputs is not resumed (more rounds is)."""
        params = {k: v for k, v in _jsonable(asdict(self.params)).items() if k != "rounds"}
        return {"templates": {t.image_id: sha256(t.label_path)[:16] for t in templates}, "pool": sorted(pool), "params": params,
                "stage_one": _jsonable(self.stage_one.settings())}

    def _remove_interrupted_writes(self) -> None:
        """Delete the hidden temporary files of writes a killed run left (``atomic_write``: ``.<name>.*``);
        nothing reads them, and the round they belong to is run again."""
        for tmp in self.work.rglob(".*") if self.work.exists() else []:
            if tmp.is_file():
                logger.warning(f"stage 2: removing {tmp}: a write interrupted by a crash (the round is run again)")
                tmp.unlink(missing_ok=True)

    def _reset(self) -> None:
        """Forget every round (the published model stays until a new round replaces it)."""
        for path in [*self.work.glob("round_*"), self.work / "stage1", self.work / "pseudo", self.work / "images", self.work / "positions"]:
            if path.exists():
                shutil.rmtree(path)
        (self.work / "state.json").unlink(missing_ok=True)

    def image_array_path(self, image_id: str) -> Path:
        return self.work / "images" / f"{image_id}.npy"

    def _write_images(self, pool: dict[str, Path], progress: bool) -> None:
        """Each pool image normalised on the network's grid (:meth:`network_shape`), as ``images/<id>.npy``
        float32 (training reads its patches from it)."""
        modality = self.stage_one.cache.modality
        for i, image_path in tqdm(pool.items(), desc="stage 2: images", disable=not progress, leave=False):
            if not self.image_array_path(i).exists():
                image = load_image(image_path)
                save_array(self.image_array_path(i), image_to_grid(normalize(image.array, modality), self.network_shape(image, self.params.network_voxels)))

    def _label_array(self, round_: int, image_id: str, grid: Volume) -> np.ndarray:
        """Round ``round_``'s label of ``image_id`` as a read-only memory map (``labels/<id>.npy``, made
        from the NIfTI the first time: round 0 writes the NIfTI only)."""
        path = self.labels_dir(round_) / f"{image_id}.npy"
        if not path.exists():
            save_array(path, self._read_label(self.labels_dir(round_) / f"{image_id}.nii.gz", grid))
        return load_array(path)

    @staticmethod
    def _read_label(path: Path, image: Volume) -> np.ndarray:
        return load_label(path, image, require_foreground=False).astype(np.uint8)

    def _train(self, finals, final_labels, current: dict[str, np.ndarray], grids: dict[str, Volume], n_classes, params: TrainParams,
               progress, notify, init=None):
        """A network (fresh, or from ``init``'s weights) trained on the templates and ``current`` pseudo-labels, all
        on the network's grid (:meth:`network_shape`; labels by majority, one image at a time: held shrunk)."""
        modality = self.stage_one.cache.modality
        shape = lambda image: self.network_shape(image, self.params.network_voxels)  # noqa: E731
        xs = [image_to_grid(normalize(img.array, modality), shape(img)) for img, _ in finals]
        xs += [load_array(self.image_array_path(i)) for i in current]
        ys = [label_to_grid(lab, shape(img), n_classes) for (img, _), lab in zip(finals, final_labels)]
        ys += [label_to_grid(np.asarray(lab), shape(grids[i]), n_classes) for i, lab in current.items()]
        self.progress.iterations = self.params.train.iterations
        bar = tqdm(total=self.params.train.iterations, desc=f"round {self.progress.round}: train", disable=not progress, leave=False)

        def on_iteration(it: int, loss: float) -> None:
            self.progress.iteration, self.progress.loss = it, round(loss, 4)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}")
            if it % 25 == 0 or it == self.params.train.iterations:
                notify(self.progress)

        weights = training_weights(len(finals), len(current), self.params.real_share)
        net = train_network(xs, ys, n_classes, params, on_iteration, device=self.device, weights=weights, init=init)
        net.grid_voxels = self.params.network_voxels  # as load_network reads it
        bar.close()
        return net

    def train_params(self, final_labels: list[np.ndarray], n_classes: int, template: Volume | None = None) -> TrainParams:
        """The training parameters, mirroring only along axes where the templates' classes map onto
        themselves (:func:`~semisam_o1.stage_two.network.mirror_axes`), with ``slice_axis`` the thick-slice axis of
        ``template``'s network grid (its spacing times the shrink factors, :func:`~semisam_o1.stage_two.network.slice_axis`;
        None without a ``template``): ``augment="affine"`` rotates and scales only in-plane there."""
        train = replace(self.params.train, flip_axes=tuple(a for a in self.params.train.flip_axes if a in mirror_axes(final_labels, n_classes)))
        if template is not None:
            factors = shrink_factors(template.array.shape, template.spacing, self.params.network_voxels)
            train = replace(train, slice_axis=slice_axis([s * f for s, f in zip(template.spacing, factors)]))
        return train


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value
