"""Stage two's research settings (:class:`StageTwoParams`): one home for each default; ``main.py params`` lists them
and ``--set stage_two.<field>=<value>`` sets one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from semisam_o1.choices import AUGMENTATIONS, BOUNDARIES, ENSEMBLES, PUBLISH, REFINEMENTS

#: A label source that changes the pool's class volumes by more than this fraction of their foreground
#: (:func:`volume_change`) extrapolates its teacher's errors: ``ensemble="auto"`` then anchors stage one
#: (round 1's network against its training labels), and pseudo-templates are dropped (stage one with them
#: against stage one from the real templates alone, :meth:`StageTwo._starting_labels`)
AUTO_VOLUME_CHANGE = 0.10

#: the confidence a round's label needs to replace the previous round's under ``replace_confidence`` auto,
#: when round 1's network kept its training labels' class volumes (:func:`resolve_replace_confidence`)
AUTO_REPLACE_CONFIDENCE = 0.6


@dataclass(frozen=True)
class TrainParams:
    """Training budget and shapes (defaults sized for 2 CPU cores and hippocampus-sized volumes)."""

    #: training and inference patch edge in voxels per axis (one number: a cube)
    patch: tuple[int, int, int] = field(default=(32, 32, 32), metadata={"range": (16, 256)})
    #: Adam steps (``None`` only in :class:`~semisam_o1.stage_two.rounds.StageTwoParams`: the plan's, see there)
    iterations: int | None = 1000
    #: patches per training step
    batch_size: int = 4
    #: Adam's peak learning rate (cosine-decayed over the round)
    learning_rate: float = 3e-3
    #: (8, ..., 64) trains 1.5x faster than (16, ..., 128) at the same Dice on hippocampus
    #: (full supervision, 30 volumes, 1000 iterations: 0.811 vs 0.807).
    channels: tuple[int, ...] = (8, 16, 32, 64)
    #: dropout of the U-Net (also drives MC-dropout uncertainty)
    dropout: float = 0.1
    #: seed of the network's initial weights, patch sampling and augmentation
    seed: int = 0
    #: spatial axes (of D, H, W) that training augmentation mirrors and prediction averages over (TTA);
    #: an axis along which the labels come in mirror pairs (left/right kidney) must be left out, see
    #: :func:`~semisam_o1.stage_two.patches.mirror_axes`
    flip_axes: tuple[int, ...] = (0, 1, 2)
    #: one of :data:`~semisam_o1.choices.AUGMENTATIONS`: "flip" (mirroring along ``flip_axes`` and intensity
    #: jitter) or "affine" (and random rotation and scaling, :func:`~semisam_o1.stage_two.patches.augmentation`)
    augment: str = field(default="flip", metadata={"choices": AUGMENTATIONS})
    #: with ``augment="affine"``: the thick-slice axis of the network's grid (of D, H, W), or None on a near-isotropic
    #: grid; with a slice axis patches are rotated about it and scaled along the other two only, so slices never mix
    #: (:func:`~semisam_o1.stage_two.patches.slice_axis`)
    slice_axis: int | None = None
    #: Training processes (torch DistributedDataParallel, see :func:`~semisam_o1.stage_two.network.train_network`); None = auto: on CUDA the
    #: most visible GPUs that divide ``batch_size`` (one process each), else 1. ``batch_size`` must be a multiple of it.
    processes: int | None = None


@dataclass(frozen=True)
class RefineParams:
    #: 0.98: only the truly ambiguous voxels (hippocampus, pool Dice vs the network's own labels:
    #: +0.009 at 0.98, -0.02 at 0.9 where the network was right more often than the neighbours).
    uncertain_quantile: float = field(default=0.98, metadata={"range": (0.0, 1.0)})
    #: Voxels below this entropy (nats) are never "uncertain", whatever the quantile.
    min_entropy: float = 0.05
    #: neighbours voting in the refinement
    k: int = field(default=10, metadata={"range": (1, 100)})
    #: Weight of the common-frame position (voxels) next to the unit feature vector; 0 = features only.
    position_weight: float = field(default=0.2, metadata={"range": (0.0, 10.0)})
    #: Confident voxels sampled (uniformly, all classes at one rate) into the FAISS index (memory budget).
    bank_size: int = 60000
    #: The bank holds the structures and this many voxels of background around them (where the
    #: uncertain voxels are); 0 = every confident voxel.
    band: int = 3
    #: seed of the bank's sampling
    seed: int = 0


@dataclass(frozen=True)
class StageTwoParams:
    rounds: int = 3
    train: TrainParams = TrainParams()
    refine: RefineParams = RefineParams()
    #: one of :data:`~semisam_o1.choices.REFINEMENTS`: "none" (the soft labels' argmax), "voxel" (the paper's
    #: kNN relabelling of the most uncertain voxels; it lowered LA's and CHAOS's pool labels, docs/experiments.md) or
    #: "volume" (the published code, ablation)
    refinement: str = field(default="none", metadata={"choices": REFINEMENTS})
    #: MC-dropout passes per flip when a round predicts the pool (uncertainty)
    mc_samples: int = 2
    #: see :data:`~semisam_o1.choices.PUBLISH`; with a signal, rounds also stop early once a round is not the best so far.
    #: Default: the round network's own mean entropy (lowest wins). It falls nearly every round, so it
    #: publishes the last round unless a round's network grows less certain, which then also stops the
    #: rounds; which round each signal would pick is in ``benchmarks/results/{stage2,chaos}.json``.
    publish: str = field(default="network_entropy", metadata={"choices": PUBLISH})
    #: pool images promoted to pseudo-templates for round 0 (0 = off), dropped when they change the pool's
    #: class volumes by more than ``pseudo_templates_volume_change``: see :meth:`StageTwo._starting_labels`
    pseudo_templates: int = field(default=1, metadata={"range": (0, 20)})
    #: pseudo-templates are dropped when they change the pool's stage-one class volumes by more than this fraction
    pseudo_templates_volume_change: float = AUTO_VOLUME_CHANGE
    #: round 0's borders: "edges" (snapped to the image's intensity edges within one voxel,
    #: :func:`~semisam_o1.stage_two.boundary.snap_to_edges` with ``boundary_beta``) or "none" (stage one's as drawn)
    boundary: str = field(default="edges", metadata={"choices": BOUNDARIES})
    #: the random walker's edge sensitivity (beta) when round 0's borders are snapped
    boundary_beta: float = 1000.0
    #: a round's label replaces the previous round's only where the top class of its soft label holds at
    #: least this probability (0 = everywhere; :func:`confident_replacement`); ``None`` (auto): decided from
    #: round 1's network (:func:`resolve_replace_confidence`)
    replace_confidence: float | None = field(default=None, metadata={"range": (0.0, 1.0)})
    #: share of every round's training patches drawn from the real-labelled images (templates and final labels,
    #: split evenly among them), the rest from the pool's pseudo-labels (split evenly); 0: every image equally
    #: often (each once per epoch), see :func:`training_weights`. Real labels are exact and pseudo-labels carry
    #: the template's propagation errors, so the real ones get half the say however large the pool is.
    real_share: float = field(default=0.5, metadata={"range": (0.0, 0.95)})
    #: rounds after the first start from the previous round's network instead of fresh weights (the full
    #: learning-rate schedule each round, at ``warm_lr`` x the peak: cosine annealing with warm restarts), so round ``k``'s network has
    #: trained ``k`` x ``train.iterations`` steps, the later ones on the later rounds' labels; the same
    #: compute per round. False: every round trains a fresh network (the paper's design)
    warm_start: bool = True
    #: with ``warm_start``, the peak learning rate of the rounds after the first as a multiple of round 1's
    #: (``train.learning_rate``): each warm restart climbs out of the previous round's minimum, towards the
    #: new labels, instead of fine-tuning where it was (1.0: the same schedule every round)
    warm_lr: float = field(default=2.0, metadata={"range": (0.1, 10.0)})
    #: a round's class that fails stage one's safety-floor check against stage one's own label of that
    #: image (Dice agreement < 0.5 or volume outside [1/1.4, 1.4] x) returns to stage one's voxels
    teacher_floor: bool = True
    #: the network trains and predicts on each image shrunk to at most this many voxels (finest axes first,
    #: :func:`~semisam_o1.stage_one.plan.shrink_factors`; ``None``/0: the image's own grid); soft labels come back to
    #: the image's grid by trilinear interpolation. A 32-voxel patch then sees 40 mm of a 0.625 mm LA scan
    #: instead of 20 mm, and prediction touches 8x fewer voxels.
    network_voxels: int | None = field(default=1_000_000, metadata={"range": (0, 10**10)})
    #: a round's soft labels: ``"mean"`` of stage one's and every round's network so far (temporal
    #: ensemble), ``"anchored"``: stage one's and the mean of the rounds' networks half and half,
    #: ``"latest"``: stage one's and this round's network half and half, ``"network"``: this round's network
    #: alone (:func:`ensemble_weights`), or ``"auto"``: ``"mean"``, or ``"latest"`` (``"anchored"`` without
    #: ``warm_start``) from round 2 on when round 1's network changed its training labels' class volumes by
    #: more than :data:`AUTO_VOLUME_CHANGE` (:func:`resolve_ensemble`)
    ensemble: str = field(default="auto", metadata={"choices": ENSEMBLES})
