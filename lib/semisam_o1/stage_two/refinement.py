"""Stage two's pseudo-label correction in the foundation model's feature space.

Voxel level (what the paper describes, :func:`refine_voxels`): voxels whose predictive entropy is
above a pool-wide quantile take the similarity-weighted vote of their ``k`` nearest *confident*
voxels, searched with FAISS over a sample (below) of the confident voxels of the whole pool and
every template voxel. A voxel's search vector is its L2-normalised foundation feature, optionally
followed by its position in a common anatomical frame (the first template's voxel grid, through the
stage-one registration) times ``position_weight``: feature similarity alone cannot tell the left end
of a structure from its right end. Votes are weighted by ``max(0, 1 - d / 2)`` for squared distance
``d`` (= cosine similarity without position).

The bank is a uniform sample (one rate for every class, so the vote estimates the local class
mixture) of the confident voxels of the structures and a ``band`` of background around them, where
the uncertain voxels lie. A class-balanced sample, or votes weighted by class frequency, would tilt
the vote towards the rarer class (foreground) at every border.

Volume level (the published code, :func:`refine_volumes`, kept as an ablation): the most uncertain
volumes take the whole label map of their most similar confident volume.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import faiss
import numpy as np
from monai.transforms import ResizeWithPadOrCrop
from scipy import ndimage

from semisam_o1.stage_one.feature_cache import FeatureGrid, as_grid, unit_rows
from semisam_o1.stage_two.params import RefineParams

#: At most this many voxels (every n-th of the pool) estimate the pool-wide entropy quantile.
QUANTILE_VOXELS = 4_000_000


@dataclass
class RefineCase:
    """One volume: ``features`` (:class:`FeatureGrid` or dense (C, D, H, W)), ``label`` (D, H, W) int,
    ``entropy`` (D, H, W) nats.

    ``position``: every voxel's index in the common frame (the first template's voxel grid) as a
    3-channel :class:`FeatureGrid` (or a dense ``(D, H, W, 3)`` array), or ``None`` to search by
    features alone. Templates have ``is_template=True``: their labels
    are a clinician's, all voxels count as confident and they are never changed.
    """

    features: FeatureGrid
    label: np.ndarray
    entropy: np.ndarray
    is_template: bool = False
    position: FeatureGrid | None = None

    def __post_init__(self):
        self.features = as_grid(self.features)
        if isinstance(self.position, np.ndarray):
            self.position = FeatureGrid(self.position, (1, 1, 1), tuple(self.position.shape[:3]))

    def vectors(self, voxels: np.ndarray, position_weight: float) -> np.ndarray:
        """Search vectors of the flat voxel indices ``voxels``: (N, C) unit features [+ (N, 3) weighted position]."""
        feats = unit_rows(self.features.at_flat(voxels))
        if self.position is None or position_weight == 0:
            return feats
        return np.ascontiguousarray(np.concatenate([feats, position_weight * self.position.at_flat(voxels)], 1), np.float32)


@dataclass
class RefineResult:
    labels: list[np.ndarray]
    threshold: float
    uncertain_voxels: int
    #: Voxels whose label changed, per new class value.
    changed_per_class: dict[int, int] = field(default_factory=dict)


def entropy_threshold(cases: list[RefineCase], params: RefineParams) -> float:
    """The pool-wide entropy above which a (non-template) voxel is uncertain."""
    pool = [c.entropy.ravel() for c in cases if not c.is_template]
    step = max(1, -(-sum(len(e) for e in pool) // QUANTILE_VOXELS))  # a regular subsample for large pools
    pooled = np.concatenate([e[::step] for e in pool]).astype(np.float32)
    return max(float(np.quantile(pooled, params.uncertain_quantile)), params.min_entropy)


def _near_structures(label: np.ndarray, band: int) -> np.ndarray:
    """(D, H, W) bool: the labelled structures and ``band`` voxels of background around them."""
    return ndimage.binary_dilation(label > 0, iterations=band) if band > 0 else np.ones(label.shape, bool)


def refine_voxels(cases: list[RefineCase], params: RefineParams = RefineParams(),
                  sink: Callable[[int, np.ndarray], None] | None = None) -> RefineResult:
    """Relabel the uncertain voxels of every non-template case by kNN over confident voxels.

    Labels and entropies may be memory maps: cases are read one at a time (the bank's candidates are
    counted in one pass and sampled in a second, so no pool-wide index list is held). With ``sink``,
    each non-template case's new label is handed to ``sink(case_index, label)`` as soon as it is made
    and not kept (``RefineResult.labels`` is then empty): memory stays one volume's worth.
    """
    rng = np.random.default_rng(params.seed)
    threshold = entropy_threshold(cases, params)
    classes = sorted({int(v) for c in cases for v in np.unique(c.label)})

    def confident(c: RefineCase) -> np.ndarray:
        return np.flatnonzero(_near_structures(c.label, params.band) & (c.is_template | (np.asarray(c.entropy) <= threshold)))

    total = sum(len(confident(c)) for c in cases)
    rate = min(1.0, params.bank_size / max(1, total))
    picked = []
    for c in cases:
        idx = confident(c)
        picked.append(idx[rng.random(len(idx)) < rate])
    bank = np.concatenate([c.vectors(idx, params.position_weight) for c, idx in zip(cases, picked)])
    bank_labels = np.concatenate([np.asarray(c.label).reshape(-1)[idx] for c, idx in zip(cases, picked)])
    index = faiss.IndexFlatL2(bank.shape[1])
    index.add(bank)
    new_labels, uncertain_total, changed = [], 0, {v: 0 for v in classes}
    for n, c in enumerate(cases):
        if c.is_template:
            if sink is None:
                new_labels.append(np.array(c.label))
            continue
        label = np.array(c.label)  # a writable copy (the case's may be a read-only memory map)
        uncertain = np.flatnonzero(np.asarray(c.entropy).ravel() > threshold)
        uncertain_total += len(uncertain)
        if len(uncertain):
            dist, nn = index.search(c.vectors(uncertain, params.position_weight), params.k)
            weights = np.clip(1 - dist / 2, 0, None)
            votes = np.zeros((len(uncertain), max(classes) + 1), np.float32)
            for j in range(params.k):
                np.add.at(votes, (np.arange(len(uncertain)), bank_labels[nn[:, j]]), weights[:, j])
            new = votes.argmax(1)
            flat = label.reshape(-1)
            moved = new != flat[uncertain]
            for v in classes:
                changed[v] += int((moved & (new == v)).sum())
            flat[uncertain] = new
        if sink is None:
            new_labels.append(label)
        else:
            sink(n, label)
    return RefineResult(new_labels, threshold, uncertain_total, changed)


def _global_descriptor(features: FeatureGrid) -> np.ndarray:
    """(C,) mean of the stored features, L2-normalised."""
    return unit_rows(features.sample().mean(0))


def refine_volumes(cases: list[RefineCase], fraction: float = 0.1, sink: Callable[[int, np.ndarray], None] | None = None) -> RefineResult:
    """Ablation: the ``fraction`` most uncertain volumes (mean entropy) take the label map of the most
    similar (global feature) confident volume, centre-aligned. ``sink`` as in :func:`refine_voxels`."""
    candidates = [i for i, c in enumerate(cases) if not c.is_template]
    mean_entropy = np.array([float(np.mean(cases[i].entropy, dtype=np.float64)) for i in candidates])
    n_uncertain = max(1, int(round(fraction * len(candidates))))
    uncertain = [candidates[j] for j in np.argsort(-mean_entropy)[:n_uncertain]]
    donors = [i for i in range(len(cases)) if i not in uncertain]
    descriptors = {i: _global_descriptor(c.features) for i, c in enumerate(cases)}
    labels, changed = [], {}
    for i, case in enumerate(cases):
        label = np.array(case.label)
        if i in uncertain:
            donor = max(donors, key=lambda d: float(descriptors[i] @ descriptors[d]))
            new = np.asarray(ResizeWithPadOrCrop(label.shape)(np.asarray(cases[donor].label)[None]))[0].astype(label.dtype)  # centre-aligned
            for v in np.unique(new[new != label]):
                changed[int(v)] = changed.get(int(v), 0) + int(((new == v) & (label != v)).sum())
            label = new
        if sink is None:
            labels.append(label)
        elif not case.is_template:
            sink(i, label)
    return RefineResult(labels, threshold=float("nan"), uncertain_voxels=sum(cases[i].label.size for i in uncertain), changed_per_class=changed)
