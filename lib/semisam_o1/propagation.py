"""Stage one of SemiSAM-O1: template label -> pseudo-label of an unlabelled volume.

Method: registration-guided non-local patch label fusion in foundation-model feature space.
The template is registered to the target (affine + demons, :mod:`semisam_o1.registration`), which
maps every target voxel to a continuous template voxel index. Each target voxel then searches a
``(2r+1)^3`` window of template voxels around that point; every template voxel votes for its label
with weight ``exp((s - s_max) / h)``, ``s`` = cosine similarity of the two voxels' encoder features
(``s_max`` = best similarity over all windows of all templates). Per-class vote maps are Gaussian
smoothed, arg-maxed and cleaned (largest connected component). Target voxels mapped farther than
``margin`` voxels from the template foreground are background without a search.

Several templates (banks) fuse their votes (multi-atlas). Features arrive already in the stored
space as a :class:`~semisam_o1.feature_cache.FeatureGrid` (or a dense ``(C, D, H, W)`` array) and are
read only at the voxels that are searched; they are L2-normalised here.

Measured on MSD hippocampus (template 001, 19 targets, LiteMedSAM s64 3 axes, PCA-32 fp16):
mean Dice 0.80 vs 0.70 affine atlas, 0.75 demons atlas, 0.75 global voxel kNN.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from semisam_o1.feature_cache import as_grid

__all__ = ["PropagationParams", "TemplateBank", "build_bank", "propagate", "class_prototypes", "propagate_prototypes"]


@dataclass
class PropagationParams:
    """Parameters of :func:`propagate`, defaults = best measured values."""

    #: search window half-width (template voxels): window = (2 * radius + 1) ** 3
    radius: int = 3
    #: softmax temperature on cosine similarity
    h: float = 0.05
    #: target voxels mapped farther than this (template voxels) from template foreground -> background
    margin: float = 5.0
    #: Gaussian sigma (voxels) on the per-class vote maps before arg-max; 0 = off
    sigma: float = 1.0
    #: keep the largest connected component of the foreground and of each class
    largest_cc: bool = True


@dataclass
class TemplateBank:
    """Template voxels for one template (those within ``margin + radius`` of its foreground).

    Attributes:
        features: ``(N, C)`` float32, L2-normalised, in the stored feature space.
        coords: ``(N, 3)`` float32 template voxel index (nibabel order, integer-valued).
        labels: ``(N,)`` int64 class per voxel.
        core: ``(N,)`` bool, voxel within ``margin`` of the template foreground (target voxels
            mapped onto a core voxel are searched).
        shape: template volume shape ``(D, H, W)``.
    """

    features: np.ndarray
    coords: np.ndarray
    labels: np.ndarray
    core: np.ndarray
    shape: tuple[int, int, int]


def _l2n(x: np.ndarray) -> np.ndarray:
    return (x / (np.linalg.norm(x, axis=-1, keepdims=True) + 1e-6)).astype(np.float32)


def build_bank(
    image: np.ndarray,
    label: np.ndarray,
    features: np.ndarray,
    max_voxels: int = 200_000,
    seed: int = 0,
    params: PropagationParams | None = None,
) -> TemplateBank:
    """Template bank from one labelled template.

    Args:
        image: ``(D, H, W)`` float32 in [0, 1] (kept for API symmetry; not used by the method).
        label: ``(D, H, W)`` int class map (0 background).
        features: :class:`FeatureGrid` (or dense ``(C, D, H, W)``) in the stored feature space.
        max_voxels: cap on bank size; above it, voxels are subsampled class-balanced (equal share
            per class, all of a class if it has fewer), the rest do not vote.
        seed: subsampling seed.
        params: gives ``margin`` and ``radius`` (bank = voxels within ``margin + radius`` of foreground).
    """
    p = params or PropagationParams()
    label = np.asarray(label).astype(np.int64)
    dist = ndimage.distance_transform_edt(label == 0)
    sel = np.flatnonzero(dist.reshape(-1) <= p.margin + p.radius + 1)
    lab = label.reshape(-1)[sel]
    if len(sel) > max_voxels:
        rng = np.random.default_rng(seed)
        classes = np.unique(lab)
        share = max_voxels // len(classes)
        keep = []
        for c in classes:
            idx = np.flatnonzero(lab == c)
            keep.append(idx if len(idx) <= share else rng.choice(idx, share, replace=False))
        keep = np.sort(np.concatenate(keep))
        sel, lab = sel[keep], lab[keep]
    coords = np.stack(np.unravel_index(sel, label.shape), -1).astype(np.float32)
    feats = _l2n(as_grid(features).at_flat(sel))
    return TemplateBank(feats, coords, lab, dist.reshape(-1)[sel] <= p.margin, tuple(label.shape))


def _largest_cc(mask: np.ndarray) -> np.ndarray:
    lab, n = ndimage.label(mask)
    if n <= 1:
        return mask
    sizes = ndimage.sum(mask, lab, range(1, n + 1))
    return lab == (int(np.argmax(sizes)) + 1)


#: Target voxels mapped per chunk when the search region is found (bounds temporary memory).
SLAB_VOXELS = 1 << 21
#: Searched voxels scored per chunk (a chunk holds ``(2r+1)^3`` x this many similarities).
QUERY_CHUNK = 1 << 15

def _slab_coords(coords, z0: int, z1: int) -> np.ndarray:
    """Template voxel index of target slabs ``z0:z1`` (axis 0): ``(z1 - z0, H, W, 3)``."""
    return coords(z0, z1) if callable(coords) else coords[z0:z1]


def _search_region(bank: TemplateBank, coords, shape: tuple[int, ...], r: int) -> tuple[np.ndarray, np.ndarray]:
    """Target voxels to search for one bank and where they fall in its padded template grid.

    Returns ``roi`` (flat target indices, sorted) and ``base`` (flat index in the template grid padded
    by ``r``): voxels mapped inside the template onto a ``core`` voxel of the bank.
    """
    ts = np.array(bank.shape)
    pad = ts + 2 * r
    core = np.zeros(int(np.prod(pad)), bool)
    core[np.ravel_multi_index((bank.coords[bank.core].astype(np.int64) + r).T, pad)] = True
    plane = int(np.prod(shape[1:]))
    step = max(1, SLAB_VOXELS // plane)
    rois, bases = [], []
    for z0 in range(0, shape[0], step):
        z1 = min(shape[0], z0 + step)
        idx = np.rint(_slab_coords(coords, z0, z1).reshape(-1, 3)).astype(np.int64) + r
        inside = np.flatnonzero(np.all((idx >= r) & (idx < ts + r), 1))
        lin = np.ravel_multi_index(idx[inside].T, pad)
        keep = core[lin]
        rois.append(inside[keep] + z0 * plane)
        bases.append(lin[keep])
    return np.concatenate(rois), np.concatenate(bases)


def _bank_votes(bank: TemplateBank, query: torch.Tensor, base: np.ndarray, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cosine similarities of ``N`` unit query vectors to every bank voxel of the ``(2r+1)^3`` template
    window around ``base`` (flat index, padded grid): best ``(N,)``, all ``(W, N)`` (-inf where the
    window voxel is not in the bank) and those voxels' labels ``(W, N)``."""
    pad = np.array(bank.shape) + 2 * r
    n_bank = len(bank.labels)
    lookup = np.full(int(np.prod(pad)), n_bank, np.int64)  # bank row of each padded template voxel; n_bank = none
    lookup[np.ravel_multi_index((bank.coords.astype(np.int64) + r).T, pad)] = np.arange(n_bank)
    lookup = torch.from_numpy(lookup)
    feats = torch.cat([torch.from_numpy(bank.features), torch.zeros(1, bank.features.shape[1])])
    labels = torch.cat([torch.from_numpy(bank.labels), torch.zeros(1, dtype=torch.int64)])
    offsets = np.stack(np.meshgrid(*[np.arange(-r, r + 1)] * 3, indexing="ij"), -1).reshape(-1, 3)
    offsets = torch.from_numpy(np.ravel_multi_index((offsets + r).T, pad) - np.ravel_multi_index([r, r, r], pad))
    base = torch.from_numpy(base)
    sims = torch.empty((len(offsets), len(base)))
    rows = torch.empty((len(offsets), len(base)), dtype=torch.int64)
    for n, offset in enumerate(offsets):
        row = lookup[base + offset]
        sim = (query * feats[row]).sum(1)
        sim[row == n_bank] = -torch.inf
        sims[n], rows[n] = sim, row
    best = sims.max(0).values
    return best, sims, labels[rows]


def _bounding_box(flat: np.ndarray, shape: tuple[int, ...], margin: int) -> tuple[slice, ...]:
    """The box around flat indices ``flat`` of ``shape``, grown by ``margin`` voxels (clipped)."""
    idx = np.unravel_index(flat, shape)
    return tuple(slice(max(0, int(i.min()) - margin), min(n, int(i.max()) + 1 + margin)) for i, n in zip(idx, shape))


@torch.inference_mode()
def propagate(
    banks: list[TemplateBank],
    image: np.ndarray,
    features,
    coords_in_template: list,
    params: PropagationParams | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Pseudo-label of one target volume from one or more template banks.

    Args:
        banks: one :class:`TemplateBank` per template.
        image: ``(D, H, W)`` float32 target in [0, 1] (shape reference).
        features: target features (:class:`FeatureGrid` or dense ``(C, D, H, W)``) in the banks' space.
        coords_in_template: per bank, the continuous template voxel index of every target voxel:
            ``(D, H, W, 3)``, or a function ``(z0, z1) -> (z1 - z0, H, W, 3)`` for target slabs
            (:func:`semisam_o1.registration.map_voxels`), so large targets are mapped a slab at a time.
        params: :class:`PropagationParams` (defaults if ``None``).

    Returns:
        ``labels (D, H, W) uint8`` and ``confidence (D, H, W) float32`` in [0, 1] (the winning
        class's share of the smoothed votes; 1 outside the search region).

    Memory: besides the two outputs, only the box around the searched voxels is held dense.
    """
    p = params or PropagationParams()
    n_classes = 1 + max(int(bank.labels.max()) for bank in banks)  # label values 0..n-1
    shape = tuple(image.shape)
    features = as_grid(features)
    r = p.radius
    regions = [_search_region(bank, coords, shape, r) for bank, coords in zip(banks, coords_in_template)]
    label = np.zeros(shape, np.uint8)
    confidence = np.ones(shape, np.float32)
    searched_all = np.concatenate([roi for roi, _ in regions])
    if len(searched_all) == 0:
        return label, confidence
    box = _bounding_box(searched_all, shape, margin=int(4 * p.sigma + 2))
    box_shape = tuple(b.stop - b.start for b in box)
    n_box = int(np.prod(box_shape))

    def to_box(flat: np.ndarray) -> torch.Tensor:
        idx = np.unravel_index(flat, shape)
        return torch.from_numpy(np.ravel_multi_index(tuple(i - b.start for i, b in zip(idx, box)), box_shape))

    # Votes are kept relative to the running best similarity (log-sum-exp style) across banks.
    best = torch.full((n_box,), -torch.inf)
    votes = torch.zeros((n_classes, n_box))
    searched = torch.zeros(n_box, dtype=torch.bool)
    for bank, (roi, base) in zip(banks, regions):
        for s in range(0, len(roi), QUERY_CHUNK):  # (window x query) arrays stay ~100 MB whatever the region
            at = to_box(roi[s : s + QUERY_CHUNK])
            searched[at] = True
            query = torch.from_numpy(_l2n(features.at_flat(roi[s : s + QUERY_CHUNK])))
            smax, sims, labels_of = _bank_votes(bank, query, base[s : s + QUERY_CHUNK], r)
            new_best = torch.maximum(best[at], smax)
            scale = torch.exp((best[at] - new_best) / p.h).nan_to_num(0.0)
            weight = torch.exp((sims - new_best) / p.h)
            bank_votes = torch.stack([(weight * (labels_of == c)).sum(0) for c in range(n_classes)])
            votes[:, at] = votes[:, at] * scale + bank_votes
            best[at] = new_best

    votes = votes.numpy()
    total = votes.sum(0)
    votes = np.where(total > 0, votes / np.maximum(total, 1e-12), 0.0)
    votes[0][~searched.numpy() | (total <= 0)] = 1.0
    votes = votes.reshape(n_classes, *box_shape)
    if p.sigma > 0:
        votes = np.stack([ndimage.gaussian_filter(v, p.sigma) for v in votes])
    pred = votes.argmax(0).astype(np.uint8)
    if p.largest_cc:
        pred[~_largest_cc(pred > 0)] = 0
        for c in range(1, n_classes):
            m = pred == c
            pred[m & ~_largest_cc(m)] = 0
    label[box] = pred
    confidence[box] = (votes.max(0) / np.maximum(votes.sum(0), 1e-6)).astype(np.float32)
    return label, confidence


def class_prototypes(features, label: np.ndarray, n_classes: int) -> np.ndarray:
    """The paper's stage one, step 1: one prototype per class (background included), the mean of the
    template's L2-normalised features over the class's voxels, L2-normalised: ``(n_classes, C)``.

    Args:
        features: the template's :class:`FeatureGrid` (or dense ``(C, D, H, W)``).
        label: ``(D, H, W)`` int class map of the template.
        n_classes: classes ``0..n_classes-1``; a class with no voxel gets a zero prototype.
    """
    grid = as_grid(features)
    label = np.asarray(label).reshape(-1)
    sums = np.zeros((n_classes, grid.channels), np.float64)
    for start in range(0, len(label), SLAB_VOXELS):
        idx = np.arange(start, min(len(label), start + SLAB_VOXELS))
        np.add.at(sums, label[idx], _l2n(grid.at_flat(idx)))
    return _l2n(sums.astype(np.float32))


def propagate_prototypes(prototypes: list[np.ndarray], features, shape: tuple[int, ...], h: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """The paper's stage one, step 2 (ablation of :func:`propagate`): every target voxel takes the class
    of its most cosine-similar prototype (over all templates' prototypes of that class, the best one).

    Returns ``labels (D, H, W) uint8`` and ``confidence (D, H, W) float32``: the winning class's
    softmax share of the similarities at temperature ``h``. No registration, no clean-up.
    """
    protos = np.stack(prototypes)  # (T, K, C)
    grid = as_grid(features)
    n = int(np.prod(shape))
    label = np.empty(n, np.uint8)
    confidence = np.empty(n, np.float32)
    for start in range(0, n, SLAB_VOXELS):
        idx = np.arange(start, min(n, start + SLAB_VOXELS))
        sims = np.einsum("nc,tkc->tnk", _l2n(grid.at_flat(idx)), protos).max(0)  # (N, K): best template per class
        label[idx] = sims.argmax(1)
        w = np.exp((sims - sims.max(1, keepdims=True)) / h)
        confidence[idx] = (w.max(1) / w.sum(1)).astype(np.float32)
    return label.reshape(shape), confidence.reshape(shape)
