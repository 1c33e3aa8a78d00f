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
                                edges (:func:`~semisam_o1.boundary.snap_to_edges`; ``probs/`` likewise;
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

Soft pseudo-labels are a temporal ensemble (Laine & Aila, 2017): after round r they are the mean of
stage one's soft labels and the softmax (flip + MC-dropout mean) of every round's network so far,
``(r * previous + network_r) / (r + 1)`` (``ensemble="mean"``); with ``ensemble="anchored"`` they are the
mean of stage one's soft labels and the mean of every round's network so far, so stage one keeps half the
say in every round (:func:`ensemble_weights`); with ``ensemble="latest"`` they are the mean of stage one's and
the round's network's (which with ``warm_start`` has trained on from every earlier round's); with ``ensemble="network"`` they are the round's network's
softmax alone; ``ensemble="auto"`` (the default) is ``mean``, or from round 2 on ``latest`` (``anchored`` without
``warm_start``) when round 1's network changed the class volumes of its training labels by more than 10 % (:func:`resolve_ensemble`; each
round's stats record the ensemble it used and ``network_volume_change``). With the mean every source (stage one, each round's network) keeps an equal say, so no
single network's errors take over the labels; with ``anchored`` the networks, which learn from each
other's labels and share their errors, together weigh as much as stage one, and with ``latest`` the last one does. The entropy of the soft labels is
the voxel-wise uncertainty; the round's labels are their argmax, and with ``refinement="voxel"`` (the paper's
step; off by default) the most uncertain voxels of the argmax take the vote of their nearest confident voxels in
feature space (:func:`~semisam_o1.refinement.refine_voxels`). With
``replace_confidence`` > 0 the argmax replaces the previous round's label only where its top class holds
at least that probability (:func:`confident_replacement`); the refinement then sees that label. The default
(``None``, ``auto``) is :data:`AUTO_REPLACE_CONFIDENCE` when round 1's network kept its training labels' class
volumes (the signal that keeps ``ensemble auto`` at ``mean``), else 0 (:func:`resolve_replace_confidence`);
each round's stats record the threshold it used. With
``teacher_floor`` (default) each refined class of each image that fails the safety floor's check against
stage one's label of that image (:func:`~semisam_o1.stage_one.registration_floor`) is written as stage
one's voxels: a round can move a class's border, not lose or double the class.

The network's grid: training and prediction see each image shrunk (area average; labels by majority)
to at most ``network_voxels`` voxels (:func:`~semisam_o1.plan.shrink_factors`); its soft labels come
back to the image's own grid by trilinear interpolation, so every file above is on the image's grid
except ``images/``. Training mirrors patches, and prediction averages mirrored passes, only along the
axes where no class of the templates' labels mirrors onto another (:func:`~semisam_o1.segmenter.mirror_axes`:
a mirrored left kidney looks like a right one). The checkpoint records both (``grid_voxels``,
``flip_axes``): a served network predicts as it was trained.

Pseudo-templates (``pseudo_templates`` k > 0, default 1): :func:`choose_pseudo_templates` picks the k pool
images whose stage-one labels are most trusted among those that qualify (no class fell back to the
registration, feature consistency near the pool's median). Round 0 is stage one from the real and pseudo
templates unless that changes the pool's class volumes against the real templates' stage one by more than
``pseudo_templates_volume_change`` (0.10, as :data:`AUTO_VOLUME_CHANGE`; the measured change is in the
state); then, or when none qualifies, it is the real templates' stage one, and the state says why
(``pseudo_templates_note``).

Borders (``boundary="edges"``, default): stage one's labels sit about a voxel off the anatomy's edges
(its features are a few voxels apart); round 0 moves each class border to the image's intensity edges
within one voxel (:func:`~semisam_o1.boundary.snap_to_edges`, a random walker, memory bounded by slabs)
and the state records the fraction of foreground voxels that changed (``boundary_changed``). The teacher
floor and ``agreement_with_stage_one`` compare against round 0, the snapped labels.

Memory: no step holds the pool. Training reads patches from memory-mapped arrays
(:class:`~semisam_o1.segmenter.PatchSampler`); prediction holds one image at a time and writes its
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
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from semisam_o1.boundary import SNAP_SLAB_BYTES, snap_to_edges
from semisam_o1.choices import BOUNDARIES, ENSEMBLES, PUBLISH, REFINEMENTS, SIGNALS
from semisam_o1.evaluation import class_dice
from semisam_o1.feature_cache import FeatureGrid
from semisam_o1.normalize import normalize
from semisam_o1.plan import check_memory, shrink_factors, with_cpu_fallback
from semisam_o1.refinement import RefineCase, RefineParams, refine_volumes, refine_voxels
from semisam_o1.segmenter import (
    TrainParams, entropy, image_to_grid, label_to_grid, load_network, mirror_axes, predict_with_uncertainty, probs_to_grid, save_network,
    shrunk_shape, slice_axis, train_network,
)
from semisam_o1.stage_one import NoTemplateError, StageOne, registration_floor
from semisam_o1.templates import Template
from semisam_o1.volumes import Volume, atomic_write, label_array, load_array, load_image, load_label, load_map, read_geometry, save_label, sha256

logger = logging.getLogger(__name__)


def choose_round(rounds: list[dict], publish: str) -> dict:
    """The round whose network is published, and why: ``{"round", "by", "value", "reason"}``.

    ``publish="last"``: the last finished round. Else the round best by that signal (ties: the earlier
    round); rounds recorded without the signal (older runs) count as worst. Ground truth is never used.

    >>> choose_round([{"round": 1, "network_entropy": 0.2}, {"round": 2, "network_entropy": 0.3}], "network_entropy")["round"]
    1
    """
    if publish == "last" or not rounds:
        return {"round": len(rounds), "by": "last", "value": None, "reason": "the last finished round"}
    sign = SIGNALS[publish]
    score = lambda r: sign * r[publish] if r.get(publish) is not None else -np.inf  # noqa: E731
    best = max(rounds, key=lambda r: (score(r), -r["round"]))
    word = "highest" if sign > 0 else "lowest"
    return {"round": best["round"], "by": publish, "value": best.get(publish),
            "reason": f"{word} {publish} of rounds 1-{len(rounds)}"}


#: A label source that changes the pool's class volumes by more than this fraction of their foreground
#: (:func:`volume_change`) extrapolates its teacher's errors: ``ensemble="auto"`` then anchors stage one
#: (round 1's network against its training labels), and pseudo-templates are dropped (stage one with them
#: against stage one from the real templates alone, :meth:`StageTwo._starting_labels`)
AUTO_VOLUME_CHANGE = 0.10
#: the confidence a round's label needs to replace the previous round's under ``replace_confidence`` auto,
#: when round 1's network kept its training labels' class volumes (:func:`resolve_replace_confidence`)
AUTO_REPLACE_CONFIDENCE = 0.6


@dataclass(frozen=True)
class StageTwoParams:
    rounds: int = 3
    train: TrainParams = TrainParams()
    refine: RefineParams = RefineParams()
    #: one of :data:`~semisam_o1.choices.REFINEMENTS`: "none" (the soft labels' argmax), "voxel" (the paper's
    #: kNN relabelling of the most uncertain voxels; it lowered LA's and CHAOS's pool labels, see the README) or
    #: "volume" (the published code, ablation)
    refinement: str = "none"
    mc_samples: int = 2
    #: see :data:`~semisam_o1.choices.PUBLISH`; with a signal, rounds also stop early once a round is not the best so far.
    #: Default: the round network's own mean entropy (lowest wins). It falls nearly every round, so it
    #: publishes the last round unless a round's network grows less certain, which then also stops the
    #: rounds; which round each signal would pick is in ``benchmarks/results/{stage2,chaos}.json``.
    publish: str = "network_entropy"
    #: pool images promoted to pseudo-templates for round 0 (0 = off), dropped when they change the pool's
    #: class volumes by more than ``pseudo_templates_volume_change``: see :meth:`StageTwo._starting_labels`
    pseudo_templates: int = 1
    pseudo_templates_volume_change: float = AUTO_VOLUME_CHANGE
    #: round 0's borders: "edges" (snapped to the image's intensity edges within one voxel,
    #: :func:`~semisam_o1.boundary.snap_to_edges` with ``boundary_beta``) or "none" (stage one's as drawn)
    boundary: str = "edges"
    boundary_beta: float = 1000.0
    #: a round's label replaces the previous round's only where the top class of its soft label holds at
    #: least this probability (0 = everywhere; :func:`confident_replacement`); ``None`` (auto): decided from
    #: round 1's network (:func:`resolve_replace_confidence`)
    replace_confidence: float | None = None
    #: share of every round's training patches drawn from the real-labelled images (templates and final labels,
    #: split evenly among them), the rest from the pool's pseudo-labels (split evenly); 0: every image equally
    #: often (each once per epoch), see :func:`training_weights`. Real labels are exact and pseudo-labels carry
    #: the template's propagation errors, so the real ones get half the say however large the pool is.
    real_share: float = 0.5
    #: rounds after the first start from the previous round's network instead of fresh weights (the full
    #: learning-rate schedule each round, at ``warm_lr`` x the peak: cosine annealing with warm restarts), so round ``k``'s network has
    #: trained ``k`` x ``train.iterations`` steps, the later ones on the later rounds' labels; the same
    #: compute per round. False: every round trains a fresh network (the paper's design)
    warm_start: bool = True
    #: with ``warm_start``, the peak learning rate of the rounds after the first as a multiple of round 1's
    #: (``train.learning_rate``): each warm restart climbs out of the previous round's minimum, towards the
    #: new labels, instead of fine-tuning where it was (1.0: the same schedule every round)
    warm_lr: float = 2.0
    #: a round's class that fails stage one's safety-floor check against stage one's own label of that
    #: image (Dice agreement < 0.5 or volume outside [1/1.4, 1.4] x) returns to stage one's voxels
    teacher_floor: bool = True
    #: the network trains and predicts on each image shrunk to at most this many voxels (finest axes first,
    #: :func:`~semisam_o1.plan.shrink_factors`; ``None``/0: the image's own grid); soft labels come back to
    #: the image's grid by trilinear interpolation. A 32-voxel patch then sees 40 mm of a 0.625 mm LA scan
    #: instead of 20 mm, and prediction touches 8x fewer voxels.
    network_voxels: int | None = 1_000_000
    #: a round's soft labels: ``"mean"`` of stage one's and every round's network so far (temporal
    #: ensemble), ``"anchored"``: stage one's and the mean of the rounds' networks half and half,
    #: ``"latest"``: stage one's and this round's network half and half, ``"network"``: this round's network
    #: alone (:func:`ensemble_weights`), or ``"auto"``: ``"mean"``, or ``"latest"`` (``"anchored"`` without
    #: ``warm_start``) from round 2 on when round 1's network changed its training labels' class volumes by
    #: more than :data:`AUTO_VOLUME_CHANGE` (:func:`resolve_ensemble`)
    ensemble: str = "auto"


def volume_change(network_voxels: dict[str, int], label_voxels: dict[str, int]) -> float | None:
    """How much a network's prediction (or any new labels) changes the class volumes of the labels it trained
    on (the labels it replaces), over the pool: ``sum_c |N_c - L_c| / sum_c L_c`` over the foreground classes
    ``c`` (``N_c``: voxels the network's argmax gives class ``c``, ``L_c``: voxels of class ``c`` in its
    training labels); ``None`` without foreground. Label-free: both counts come from the pool, none from
    ground truth.

    >>> volume_change({"1": 115}, {"1": 100})
    0.15
    >>> volume_change({"1": 90, "2": 110}, {"1": 100, "2": 100})
    0.1
    """
    total = sum(label_voxels.values())
    if total == 0:
        return None
    return round(sum(abs(network_voxels.get(c, 0) - n) for c, n in label_voxels.items()) / total, 6)


def training_weights(real: int, pseudo: int, real_share: float) -> list[float] | None:
    """Per-image sampling weights of a round's training set (``real`` real-labelled images first, then ``pseudo``
    pseudo-labelled ones) so that ``real_share`` of the patches come from the real ones, or their own share of the
    images when that is larger (a real label is never drawn less often than a pseudo-label); ``None`` (every image
    equally often) when that is what they come to, ``real_share`` is 0 or one of the two groups is empty.

    >>> training_weights(1, 4, 0.5)
    [0.5, 0.125, 0.125, 0.125, 0.125]
    >>> training_weights(2, 0, 0.5) is None, training_weights(1, 4, 0.0) is None, training_weights(3, 1, 0.5) is None
    (True, True, True)
    """
    if not real_share or not real or not pseudo or real_share <= real / (real + pseudo):
        return None
    return [real_share / real] * real + [(1 - real_share) / pseudo] * pseudo


def resolve_ensemble(ensemble: str, rounds: list[dict], warm_start: bool = True) -> str:
    """The ensemble the next round uses, given the stats of the rounds finished so far.

    Every ensemble but ``"auto"`` is itself. ``"auto"`` is ``"mean"`` in round 1 (where ``mean``, ``anchored``
    and ``latest`` weigh the same, :func:`ensemble_weights`) and later, if round 1's network changed its
    training labels' volumes by more than :data:`AUTO_VOLUME_CHANGE` (``rounds[0]["network_volume_change"]``),
    ``"latest"`` with ``warm_start`` (each round's network has trained on from the earlier ones) or
    ``"anchored"`` without (fresh networks: their mean), else ``"mean"``: a network that grows or shrinks what
    it learnt from is extrapolating its teacher's errors, and its votes then weigh against stage one's half
    and half instead of outvoting it round by round.

    >>> resolve_ensemble("auto", []), resolve_ensemble("auto", [{"network_volume_change": 0.15}])
    ('mean', 'latest')
    >>> resolve_ensemble("auto", [{"network_volume_change": 0.15}], warm_start=False)
    'anchored'
    """
    if ensemble != "auto":
        return ensemble
    change = rounds[0].get("network_volume_change") if rounds else None
    if change is not None and change > AUTO_VOLUME_CHANGE:
        return "latest" if warm_start else "anchored"
    return "mean"


def resolve_replace_confidence(replace_confidence: float | None, first_round_change: float | None) -> float:
    """The probability a round's top class needs to replace the previous round's label (0: everywhere).

    A number is itself. ``None`` (``auto``) is :data:`AUTO_REPLACE_CONFIDENCE` when round 1's network changed
    its training labels' class volumes on the pool by at most :data:`AUTO_VOLUME_CHANGE`
    (``first_round_change``, its ``network_volume_change``: label-free, the signal that keeps ``ensemble auto``
    at ``mean``), else 0. A network that keeps the volumes disagrees with its labels only along their borders,
    where a flip the ensemble holds with less than 0.6 is as likely noise as a correction, so later rounds
    could only move such labels back and forth; a network that grows or shrinks the classes is correcting a
    systematic error of stage one's (the left atrium's labels are 1.10 x the truth), and under ``auto`` its
    rounds weigh stage one half and half (``latest``), so no flip of stage one's label would ever reach 0.6.

    >>> resolve_replace_confidence(None, 0.02), resolve_replace_confidence(None, 0.18), resolve_replace_confidence(0.7, 0.18)
    (0.6, 0.0, 0.7)
    """
    if replace_confidence is not None:
        return replace_confidence
    return AUTO_REPLACE_CONFIDENCE if first_round_change is not None and first_round_change <= AUTO_VOLUME_CHANGE else 0.0


def ensemble_weights(ensemble: str, round_: int) -> tuple[float, float, float]:
    """Round ``round_``'s (>= 1) soft labels as ``w_net * network + w_prev * previous + w_stage1 * stage_one``.

    ``previous`` is round ``round_ - 1``'s soft labels (stage one's for round 1), so the weights unroll to:

    - ``"mean"``: every source an equal say, ``(stage_one + net_1 + ... + net_r) / (r + 1)``
    - ``"anchored"``: ``stage_one / 2 + (net_1 + ... + net_r) / (2 r)``
    - ``"latest"``: ``(stage_one + net_r) / 2``: with ``warm_start`` round r's network has trained on from
      every earlier one, so it stands for them
    - ``"network"``: ``net_r`` alone

    Example: round 2 gives ``(1/3, 2/3, 0)`` (mean), ``(1/4, 1/2, 1/4)`` (anchored), ``(1/2, 0, 1/2)`` (latest),
    ``(1, 0, 0)`` (network); round 1 is half network, half stage one for mean ``(1/2, 1/2, 0)``, anchored and
    latest ``(1/2, 0, 1/2)``.

    Returns:
        ``(w_net, w_prev, w_stage1)``, summing to 1.
    """
    if ensemble == "mean":
        return 1 / (round_ + 1), round_ / (round_ + 1), 0.0
    if ensemble == "anchored":
        return 1 / (2 * round_), (round_ - 1) / round_, 1 / (2 * round_)
    if ensemble == "latest":
        return 0.5, 0.0, 0.5
    if ensemble == "network":
        return 1.0, 0.0, 0.0
    raise ValueError(f"ensemble must be one of {ENSEMBLES} ('auto' through resolve_ensemble), got '{ensemble}'")


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


class StageTwo:
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
            self._stage_one_labels([*templates, *(t for t in pseudo if t.image_id != i)], {i: path}, "pseudo", n_classes, progress=False)
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
        :func:`~semisam_o1.boundary.snap_to_edges`'s, one image at a time, and ``borders/<id>.json``
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
        borders snapped to the image's edges (:func:`~semisam_o1.boundary.snap_to_edges`), soft labels first
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
                _save_array(probs, soft_label(prediction.label, prediction.confidence, n_classes))
                save_label(prediction.label, read_geometry(image_path), path)
                atomic_write(score, lambda tmp: tmp.write_text(json.dumps(trust_record(prediction))))
            records[i] = json.loads(score.read_text())
        return records

    def image_array_path(self, image_id: str) -> Path:
        return self.work / "images" / f"{image_id}.npy"

    def _write_images(self, pool: dict[str, Path], progress: bool) -> None:
        """Each pool image normalised on the network's grid (:meth:`network_shape`), as ``images/<id>.npy``
        float32 (training reads its patches from it)."""
        modality = self.stage_one.cache.modality
        for i, image_path in tqdm(pool.items(), desc="stage 2: images", disable=not progress, leave=False):
            if not self.image_array_path(i).exists():
                image = load_image(image_path)
                _save_array(self.image_array_path(i), image_to_grid(normalize(image.array, modality), self.network_shape(image, self.params.network_voxels)))

    @staticmethod
    def network_shape(image: Volume, grid_voxels: int | None) -> tuple[int, int, int]:
        """The grid a network trained under ``grid_voxels`` (:data:`StageTwoParams.network_voxels`) sees ``image`` on."""
        return shrunk_shape(image.array.shape, shrink_factors(image.array.shape, image.spacing, grid_voxels))

    def _label_array(self, round_: int, image_id: str, grid: Volume) -> np.ndarray:
        """Round ``round_``'s label of ``image_id`` as a read-only memory map (``labels/<id>.npy``, made
        from the NIfTI the first time: runs of earlier versions have the NIfTI only)."""
        path = self.labels_dir(round_) / f"{image_id}.npy"
        if not path.exists():
            _save_array(path, self._read_label(self.labels_dir(round_) / f"{image_id}.nii.gz", grid))
        return load_array(path)

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
        _save_array(self.labels_dir(round_) / f"{image_id}.npy", np.asarray(label, np.uint8))

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
                _save_array(values, grid.values)
                atomic_write(meta, lambda tmp: tmp.write_text(json.dumps({"stride": grid.stride, "shape": grid.shape})))
            info = json.loads(meta.read_text())
            out[i] = FeatureGrid(load_array(values), tuple(info["stride"]), tuple(info["shape"]))
        return out

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
            _save_array(round_dir / "uncertainty" / f"{i}.npy", uncertainty.astype(np.float16))
            for n, t in enumerate(thresholds):
                predicted, keep = confident_replacement(prob, previous, t)
                kept[t].append(float(keep.mean()))
                _save_array(round_dir / f"predicted-{n}" / f"{i}.npy", predicted)
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

    def train_params(self, final_labels: list[np.ndarray], n_classes: int, template: Volume | None = None) -> TrainParams:
        """The training parameters, mirroring only along axes where the templates' classes map onto
        themselves (:func:`~semisam_o1.segmenter.mirror_axes`), with ``slice_axis`` the thick-slice axis of
        ``template``'s network grid (its spacing times the shrink factors, :func:`~semisam_o1.segmenter.slice_axis`;
        None without a ``template``): ``augment="affine"`` rotates and scales only in-plane there."""
        train = replace(self.params.train, flip_axes=tuple(a for a in self.params.train.flip_axes if a in mirror_axes(final_labels, n_classes)))
        if template is not None:
            factors = shrink_factors(template.array.shape, template.spacing, self.params.network_voxels)
            train = replace(train, slice_axis=slice_axis([s * f for s, f in zip(template.spacing, factors)]))
        return train

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

    def load_model(self) -> torch.nn.Module | None:
        """The published network (latest finished round), or ``None`` before any training."""
        return load_network(self.model_path) if self.model_path.exists() else None

    def predict(self, net: torch.nn.Module, image: Volume) -> tuple[np.ndarray, np.ndarray]:
        """``net`` on one image (flip TTA, no MC dropout): label ``(D, H, W)`` uint8 and entropy ``(D, H, W)`` nats."""
        prob, ent = self._predict(net, image, mc_samples=0)
        return prob.argmax(0).astype(np.uint8), ent

    def _predict(self, net: torch.nn.Module, image: Volume, mc_samples: int) -> tuple[np.ndarray, np.ndarray]:
        """:func:`predict_with_uncertainty` on the stage's device (the CPU if the GPU runs out of memory), on
        the network's grid (its ``grid_voxels``, :meth:`network_shape`); the soft labels ``(C, D, H, W)`` and
        their entropy come back on ``image``'s grid.

        Raises:
            InputError: naming the image and its size, when its prediction would not fit in the memory
                available (HTTP 422 on the server), instead of an out-of-memory kill.
        """
        # the image and its normalised copy, the flipped input, the running sum and one pass (C each), the entropy
        check_memory(f"{image.path}: network prediction", image.array.shape, 4 * 3 + 8 * net.out_channels + 8)
        x = image_to_grid(normalize(image.array, self.stage_one.cache.modality), self.network_shape(image, getattr(net, "grid_voxels", None)))
        prob, ent = with_cpu_fallback(lambda device: predict_with_uncertainty(net, x, self.params.train.patch, mc_samples, device=device),
                                      self.device, f"predicting {image.path.name}")
        if prob.shape[1:] == image.array.shape:
            return prob, ent
        del ent, x
        prob = probs_to_grid(prob, image.array.shape)  # back to the image's grid
        return prob, entropy(prob)

    @staticmethod
    def summary(state: dict) -> dict:
        """What a run reports (train status, ``rounds.json``): ``rounds`` (per-round stats), ``published`` (the
        round served and the signal that chose it), ``stopped_early``, ``pseudo_templates``, ``pseudo_templates_volume_change``,
        ``pseudo_templates_note`` and ``boundary_changed`` (round 0's snapped borders, :meth:`_round_zero`)."""
        return {"rounds": state["rounds"], "published": state.get("published"), "stopped_early": state.get("stopped_early"),
                "pseudo_templates": state.get("pseudo_templates", []), "pseudo_templates_volume_change": state.get("pseudo_templates_volume_change"),
                "pseudo_templates_note": state.get("pseudo_templates_note"), "boundary_changed": state.get("boundary_changed")}

    @staticmethod
    def published(state: dict) -> int:
        """The published round of a committed ``state`` (0 before any round)."""
        return int(state.get("published", {}).get("round", len(state["rounds"])))

    def published_round(self) -> Path | None:
        """Folder of the round whose network is the published one; ``None`` when the published model
        is not that committed round's (e.g. a new run was started) or nothing is published."""
        state = self.state()
        round_dir = self.work / f"round_{self.published(state)}"
        if not state["rounds"] or not self.model_path.exists() or sha256(round_dir / "model.pt") != sha256(self.model_path):
            return None
        return round_dir

    @staticmethod
    def saved_uncertainty(round_dir: Path, image: Volume, image_id: str) -> tuple[np.ndarray, np.ndarray] | None:
        """Pseudo-label and entropy map that round ``round_dir`` wrote for ``image_id`` (``None`` if it was not in its pool)."""
        paths = (round_dir / "labels" / f"{image_id}.nii.gz", round_dir / "uncertainty" / f"{image_id}.nii.gz")
        if not all(p.exists() for p in paths):
            return None
        return load_label(paths[0], image, require_foreground=False), load_map(paths[1])

    def model_version(self) -> str | None:
        """Content hash of the published network (changes with every finished round), ``None`` before any."""
        return f"stage2-{sha256(self.model_path)[:12]}" if self.model_path.exists() else None


def soft_label(label: np.ndarray, confidence: np.ndarray, n_classes: int) -> np.ndarray:
    """Stage one's soft label ``(C, D, H, W)`` float16: ``confidence`` on the voxel's ``label``, the rest
    shared evenly by the other classes (built class by class: no float32 ``(C, D, H, W)`` copy).

    >>> soft_label(np.array([[[0, 1]]], np.uint8), np.array([[[0.8, 0.6]]], np.float32), 3)[:, 0, 0].tolist()
    [[0.7998046875, 0.199951171875], [0.0999755859375, 0.60009765625], [0.0999755859375, 0.199951171875]]
    """
    out = np.empty((n_classes, *label.shape), np.float16)
    rest = (1 - confidence) / max(n_classes - 1, 1)
    for c in range(n_classes):
        out[c] = np.where(label == c, confidence, rest)
    return out


def confident_replacement(prob: np.ndarray, previous: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """A round's hard label: the soft label's arg-max where its top class holds at least ``threshold``,
    else the previous round's label (``threshold`` 0: the arg-max everywhere).

    Args:
        prob: ``(C, D, H, W)`` float soft label of this round; previous: ``(D, H, W)`` the previous round's label.
    Returns:
        ``(label, kept)``: ``(D, H, W)`` uint8, and the bool mask of voxels that kept the previous label.

    >>> prob = np.array([[[[0.9, 0.45]]], [[[0.1, 0.55]]]], np.float32)  # two voxels, two classes
    >>> label, kept = confident_replacement(prob, np.array([[[0, 0]]], np.uint8), 0.6)
    >>> label.tolist(), kept.tolist()
    ([[[0, 0]]], [[[False, True]]])
    """
    label = prob.argmax(0).astype(np.uint8)
    if threshold <= 0:
        return label, np.zeros(label.shape, bool)
    kept = prob.max(0) < threshold
    label[kept] = previous[kept]
    return label, kept


def stage_one_trust(prediction) -> float:
    """How far stage one's label of an image can be trusted, without ground truth: the mean, over its
    classes, of the Dice agreement between the feature vote and the registration-only warp (the safety
    floor's check, :func:`~semisam_o1.stage_one.registration_floor`), 0 for a class that fell back."""
    checks = list(prediction.floor.values())
    return float(np.mean([0.0 if f["fallback"] else f["agreement"] for f in checks])) if checks else 0.0


def trust_record(prediction) -> dict:
    """What :func:`choose_pseudo_templates` needs of one stage-one prediction (no ground truth):
    ``{"trust": stage_one_trust, "consistency": best feature consistency of its mappings (``None`` if
    not recorded), "fallback": class values the safety floor returned to the registration}``."""
    values = [m["consistency"] for m in prediction.mappings.values() if m["used"] and m["consistency"] == m["consistency"]]
    return {"trust": stage_one_trust(prediction), "consistency": max(values) if values else None,
            "fallback": prediction.fallback_values}


def choose_pseudo_templates(records: dict[str, dict | float | None], k: int, tolerance: float) -> tuple[list[str], dict[str, str]]:
    """The ``k`` pool images to promote to pseudo-templates, most trusted first, and why the others
    could not be chosen.

    An image qualifies when no class of its stage-one label fell back to the registration (its votes
    agree with the warp everywhere) and its feature consistency is not more than ``tolerance`` below the
    pool's median (an image unlike the template, e.g. a failed acquisition, maps onto unlike tissue:
    hippocampus 0.94 for real images against 0.52 for one with its voxels shuffled). Among those, the
    highest :func:`stage_one_trust` wins (ties: the first id). Records of older runs (a bare trust
    number, or ``None``) qualify on trust alone.

    >>> records = {"a": {"trust": 0.8, "consistency": 0.94, "fallback": []},
    ...            "b": {"trust": 0.9, "consistency": 0.52, "fallback": []},
    ...            "c": {"trust": 0.7, "consistency": 0.93, "fallback": [2]},
    ...            "d": {"trust": 0.6, "consistency": 0.95, "fallback": []}}
    >>> chosen, excluded = choose_pseudo_templates(records, 2, 0.05)
    >>> chosen, sorted(excluded)
    (['a', 'd'], ['b', 'c'])
    """
    rows = {i: r if isinstance(r, dict) else {"trust": r or 0.0, "consistency": None, "fallback": []} for i, r in records.items()}
    measured = [r["consistency"] for r in rows.values() if r["consistency"] is not None]
    floor = float(np.median(measured)) - tolerance if measured else -np.inf
    excluded = {}
    for i, r in rows.items():
        if r["fallback"]:
            excluded[i] = f"classes {r['fallback']} fell back to the registration"
        elif r["consistency"] is not None and r["consistency"] < floor:
            excluded[i] = f"feature consistency {r['consistency']:.3f} below the pool's median - {tolerance} ({floor:.3f})"
    eligible = sorted((i for i in rows if i not in excluded), key=lambda i: (-rows[i]["trust"], i))
    return eligible[:k], excluded


def _link_or_copy(src: Path, dst: Path) -> None:
    """``dst`` (an existing temporary file, replaced) as a hard link to ``src``, or a copy where links fail."""
    dst.unlink()
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _save_array(path: Path, array: np.ndarray) -> Path:
    """``np.save`` to ``path`` atomically (memory-mapped later with ``load_array(path)``)."""
    return atomic_write(path, lambda tmp: np.save(tmp, np.ascontiguousarray(array)))


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value
