"""Stage one of SemiSAM-O1: template label -> pseudo-label of an unlabelled volume.

Method: registration-guided non-local patch label fusion in foundation-model feature space.
The template is registered to the target (affine + demons, :mod:`semisam_o1.stage_one.registration`), which
maps every target voxel to a continuous template voxel index. Each target voxel then searches a
window of template voxels around that point (half-width ``radius_mm`` per axis, in the template's
own spacing: thick slices are searched fewer slices deep); every template voxel votes for its label
with weight ``exp((s - s_max) / h)``, ``s`` = cosine similarity of the two voxels' encoder features
(``s_max`` = best similarity over all windows of all templates). Per-class vote maps are Gaussian
smoothed (``sigma_mm``), arg-maxed (``decision="volume"``: a class the arg-max starves grows to the volume
its votes sum to, :func:`~semisam_o1.stage_one.votes.volume_matched_argmax`) and cleaned per class: a class that is one connected component
in every template keeps only its largest component in the target (a class made of several
separate objects in a template is left as voted). Target voxels mapped farther than ``margin_mm``
from the template foreground are background without a search.

Several templates (banks) fuse their votes (multi-atlas). Features arrive already in the stored
space as a :class:`~semisam_o1.stage_one.feature_cache.FeatureGrid` (or a dense ``(C, D, H, W)`` array) and are
read only at the voxels that are searched; they are L2-normalised here.

Measurements per dataset: README.md's results table; every experiment: docs/experiments.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from monai.transforms import KeepLargestConnectedComponent
from scipy import ndimage

from semisam_o1.stage_one.feature_cache import as_grid, unit_rows
from semisam_o1.stage_one.params import PropagationParams
from semisam_o1.stage_one.votes import _vote_shares

__all__ = ["PropagationParams", "TemplateBank", "build_bank", "propagate", "mapping_consistency", "consistent_mappings",
           "window_radius", "single_component_classes", "keep_largest_per_class", "class_quota"]


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
        spacing: template voxel spacing (mm) per axis.
        single_component: classes that are one connected component in the template label.
    """

    features: np.ndarray
    coords: np.ndarray
    labels: np.ndarray
    core: np.ndarray
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    single_component: frozenset = frozenset()


def window_radius(spacing, radius_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """Search window of ``radius_mm`` on a grid of ``spacing`` (mm): ``(half-width, step)`` in voxels per axis.

    Half-width ``round(radius_mm / spacing)`` (0 on slices thicker than twice the radius); positions
    are taken every ``step`` voxels so an axis has at most 7 (``step = ceil(half-width / 3)``).

    >>> [a.tolist() for a in window_radius((0.625, 1.0, 7.7), 3.0)]
    [[5, 3, 0], [2, 1, 1]]
    """
    r = np.rint(float(radius_mm) / np.asarray(spacing, np.float64)).astype(np.int64)
    return r, np.maximum(1, -(-r // 3))


def single_component_classes(label: np.ndarray) -> frozenset:
    """Classes (values > 0) of ``label`` whose voxels form exactly one connected component (26-connectivity)."""
    out = set()
    for c in np.unique(label):
        if c > 0 and ndimage.label(label == c, structure=np.ones((3, 3, 3)))[1] == 1:
            out.add(int(c))
    return frozenset(out)


def keep_largest_per_class(label: np.ndarray, classes) -> np.ndarray:
    """``(D, H, W)`` uint8 ``label`` with each of ``classes`` cut to its largest connected component
    (26-connectivity, MONAI ``KeepLargestConnectedComponent``; the rest set to 0); other classes untouched."""
    out = np.array(label, np.uint8)
    for c in sorted(int(c) for c in classes):
        box = _class_box(out == c)
        if box is None:
            continue
        # every component of c lies in its bounding box: the transform runs there only (its labelling is int64 per voxel)
        part = torch.from_numpy(np.ascontiguousarray(out[box]))[None]
        out[box] = np.asarray(KeepLargestConnectedComponent(applied_labels=[c], independent=True)(part))[0]
    return out


def _class_box(mask: np.ndarray) -> tuple[slice, ...] | None:
    """The bounding box of a boolean ``mask`` (``None`` when it is empty)."""
    box = []
    for axis in range(mask.ndim):
        hit = np.flatnonzero(mask.any(tuple(a for a in range(mask.ndim) if a != axis)))
        if len(hit) == 0:
            return None
        box.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(box)


def class_quota(counts: dict[int, int], budget: int) -> dict[int, int]:
    """Voxels kept per class under a ``budget``: every class keeps all of its voxels up to an equal share;
    what small classes leave goes to the larger ones (water-filling), so a class 10x smaller than
    another is never subsampled while the budget allows.

    >>> class_quota({0: 500, 1: 100, 2: 10}, 300)
    {0: 190, 1: 100, 2: 10}
    """
    quota, left, open_ = {}, budget, sorted(counts, key=lambda c: counts[c])
    while open_:
        share = left // len(open_)
        c = open_[0]
        if counts[c] <= share:
            quota[c] = counts[c]
            left -= counts[c]
            open_.pop(0)
        else:
            for c in open_:
                quota[c] = share
            break
    return {c: quota[c] for c in counts}


def build_bank(
    image: np.ndarray,
    label: np.ndarray,
    features: np.ndarray,
    max_voxels: int = 200_000,
    seed: int = 0,
    params: PropagationParams | None = None,
    spacing=(1.0, 1.0, 1.0),
) -> TemplateBank:
    """Template bank from one labelled template.

    Args:
        image: not read (``None`` serves; kept for API symmetry).
        label: ``(D, H, W)`` int class map (0 background).
        features: :class:`FeatureGrid` (or dense ``(C, D, H, W)``) in the stored feature space.
        max_voxels: cap on bank size; above it, voxels are subsampled per class by
            :func:`class_quota` (all of a class below an equal share, the budget small classes leave
            goes to the large ones), the rest do not vote.
        seed: subsampling seed.
        params: gives ``margin_mm`` and ``radius_mm`` (bank = voxels within ``margin_mm`` + the window of foreground).
        spacing: template voxel spacing (mm) per axis.
    """
    p = params or PropagationParams()
    spacing = tuple(float(v) for v in spacing)
    label = np.asarray(label).astype(np.int64)
    dist = ndimage.distance_transform_edt(label == 0, sampling=spacing)
    reach = p.margin_mm + float(np.max(window_radius(spacing, p.radius_mm)[0] * np.asarray(spacing))) + max(spacing)
    sel = np.flatnonzero(dist.reshape(-1) <= reach)
    lab = label.reshape(-1)[sel]
    if len(sel) > max_voxels:
        rng = np.random.default_rng(seed)
        classes, counts = np.unique(lab, return_counts=True)
        quota = class_quota(dict(zip(classes.tolist(), counts.tolist())), max_voxels)
        keep = []
        for c in classes:
            idx = np.flatnonzero(lab == c)
            keep.append(idx if len(idx) <= quota[int(c)] else rng.choice(idx, quota[int(c)], replace=False))
        keep = np.sort(np.concatenate(keep))
        sel, lab = sel[keep], lab[keep]
    coords = np.stack(np.unravel_index(sel, label.shape), -1).astype(np.float32)
    feats = unit_rows(as_grid(features).at_flat(sel))
    return TemplateBank(feats, coords, lab, dist.reshape(-1)[sel] <= p.margin_mm, tuple(label.shape), spacing, single_component_classes(label))


#: Target voxels mapped per chunk when the search region is found (bounds temporary memory).
SLAB_VOXELS = 1 << 21
#: Searched voxels scored per chunk (a chunk holds ``(2r+1)^3`` x this many similarities).
QUERY_CHUNK = 1 << 15

def _slab_coords(coords, z0: int, z1: int) -> np.ndarray:
    """Template voxel index of target slabs ``z0:z1`` (axis 0): ``(z1 - z0, H, W, 3)``."""
    return coords(z0, z1) if callable(coords) else coords[z0:z1]


def _search_region(bank: TemplateBank, coords, shape: tuple[int, ...], r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Target voxels to search for one bank and where they fall in its padded template grid.

    Returns ``roi`` (flat target indices, sorted) and ``base`` (flat index in the template grid padded
    by ``r`` voxels per axis, ``(3,)``): voxels mapped inside the template onto a ``core`` voxel of the bank.
    """
    template_shape = np.array(bank.shape)
    pad = template_shape + 2 * r
    core = np.zeros(int(np.prod(pad)), bool)
    core[np.ravel_multi_index((bank.coords[bank.core].astype(np.int64) + r).T, pad)] = True
    plane = int(np.prod(shape[1:]))
    step = max(1, SLAB_VOXELS // plane)
    rois, bases = [], []
    for z0 in range(0, shape[0], step):
        z1 = min(shape[0], z0 + step)
        idx = np.rint(_slab_coords(coords, z0, z1).reshape(-1, 3)).astype(np.int64) + r
        inside = np.flatnonzero(np.all((idx >= r) & (idx < template_shape + r), 1))
        lin = np.ravel_multi_index(idx[inside].T, pad)
        keep = core[lin]
        rois.append(inside[keep] + z0 * plane)
        bases.append(lin[keep])
    return np.concatenate(rois), np.concatenate(bases)


def _bank_votes(bank: TemplateBank, query: torch.Tensor, base: np.ndarray, r: np.ndarray, step: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cosine similarities of ``N`` unit query vectors to every bank voxel of the template window
    (half-width ``r``, every ``step`` voxels, per axis ``(3,)``) around ``base`` (flat index, grid padded
    by ``r``): best ``(N,)``, all ``(W, N)`` (-inf where the window voxel is not in the bank) and those
    voxels' labels ``(W, N)``."""
    pad = np.array(bank.shape) + 2 * r
    n_bank = len(bank.labels)
    lookup = np.full(int(np.prod(pad)), n_bank, np.int64)  # bank row of each padded template voxel; n_bank = none
    lookup[np.ravel_multi_index((bank.coords.astype(np.int64) + r).T, pad)] = np.arange(n_bank)
    lookup = torch.from_numpy(lookup)
    feats = torch.cat([torch.from_numpy(bank.features), torch.zeros(1, bank.features.shape[1])])
    labels = torch.cat([torch.from_numpy(bank.labels), torch.zeros(1, dtype=torch.int64)])
    axes = [np.arange(-(a // t) * t, (a // t) * t + 1, t) for a, t in zip(r, step)]
    offsets = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
    offsets = torch.from_numpy(np.ravel_multi_index((offsets + r).T, pad) - np.ravel_multi_index(tuple(r), pad))
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


@torch.inference_mode()
def mapping_consistency(bank: TemplateBank, features, coords, shape: tuple[int, ...], params: PropagationParams | None = None,
                        samples: int = 20000) -> float:
    """How well a registration's mapping agrees with the features: the mean, over the target voxels it
    maps onto the template's search region (``samples`` of them, evenly spread), of the best cosine
    similarity in the search window it points at. No label is used: a failed registration points
    voxels at unlike tissue and scores clearly lower (left atrium: 0.49 against 0.71 for the same
    target's working registration). ``nan`` when no target voxel lands on the region.

    Args: as :func:`propagate` for one bank (``coords``: array or slab function); ``shape``: the target's.
    """
    p = params or PropagationParams()
    r, step = window_radius(bank.spacing, p.radius_mm)
    roi, base = _search_region(bank, coords, shape, r)
    if len(roi) == 0:
        return float("nan")
    pick = np.unique(np.linspace(0, len(roi) - 1, min(samples, len(roi))).astype(np.int64))
    query = torch.from_numpy(unit_rows(as_grid(features).at_flat(roi[pick])))
    best = _bank_votes(bank, query, base[pick], r, step)[0]
    best = best[torch.isfinite(best)]
    return float(best.mean()) if len(best) else float("nan")


def consistent_mappings(scores: list[float], tolerance: float) -> list[bool]:
    """Which mappings to keep: those within ``tolerance`` of the best :func:`mapping_consistency`
    (at least the best one; ``nan`` scores are left out unless all are ``nan``).

    >>> consistent_mappings([0.71, 0.49], 0.05)
    [True, False]
    >>> consistent_mappings([0.741, 0.745], 0.05)
    [True, True]
    """
    valid = [s for s in scores if s == s]
    if not valid:
        return [True] * len(scores)
    best = max(valid)
    return [s == s and s >= best - tolerance for s in scores]


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
    spacing=(1.0, 1.0, 1.0),
) -> tuple[np.ndarray, np.ndarray]:
    """Pseudo-label of one target volume from one or more template banks.

    Args:
        banks: one :class:`TemplateBank` per template.
        image: ``(D, H, W)`` array on the target's grid: only its shape is read (the raw image serves).
        features: target features (:class:`FeatureGrid` or dense ``(C, D, H, W)``) in the banks' space.
        coords_in_template: per bank, the continuous template voxel index of every target voxel:
            ``(D, H, W, 3)``, or a function ``(z0, z1) -> (z1 - z0, H, W, 3)`` for target slabs
            (:func:`semisam_o1.stage_one.registration.map_voxels`), so large targets are mapped a slab at a time.
        params: :class:`PropagationParams` (defaults if ``None``).
        spacing: target voxel spacing (mm) per axis (vote smoothing).

    Returns:
        ``labels (D, H, W) uint8`` and ``confidence (D, H, W) float32`` in [0, 1] (the winning
        class's share of the smoothed votes; 1 outside the search region).

    Memory: besides the two outputs, only the box around the searched voxels is held dense.
    """
    p = params or PropagationParams()
    n_classes = 1 + max(int(bank.labels.max()) for bank in banks)  # label values 0..n-1
    shape = tuple(image.shape)
    features = as_grid(features)
    windows = [window_radius(bank.spacing, p.radius_mm) for bank in banks]
    regions = [_search_region(bank, coords, shape, w[0]) for bank, coords, w in zip(banks, coords_in_template, windows)]
    sigma = p.sigma_mm / np.asarray(spacing, np.float64)
    label = np.zeros(shape, np.uint8)
    confidence = np.ones(shape, np.float32)
    searched_all = np.concatenate([roi for roi, _ in regions])
    if len(searched_all) == 0:
        return label, confidence
    box = _bounding_box(searched_all, shape, margin=int(4 * sigma.max() + 2))
    votes, searched = _fuse_votes(banks, regions, windows, features, shape, box, p.h, n_classes)
    pred, share = _vote_shares(votes, searched, tuple(b.stop - b.start for b in box), sigma if p.sigma_mm > 0 else None,
                               volume_matched=p.decision == "volume")
    if p.largest_cc:
        pred = keep_largest_per_class(pred, set.intersection(*[set(bank.single_component) for bank in banks]))
    label[box] = pred
    confidence[box] = share
    return label, confidence


def _fuse_votes(banks: list[TemplateBank], regions, windows, features: FeatureGrid, shape: tuple[int, ...], box: tuple[slice, ...],
                h: float, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Every bank's similarity-weighted class votes for the searched target voxels inside ``box``.

    A searched voxel (``regions[b]``: flat target indices and their template voxels) gets from bank ``b``
    ``sum exp((s - best) / h)`` per class over the template voxels of its window (``windows[b]``), ``s`` their
    cosine similarity and ``best`` the highest similarity over all banks so far: the sums are rescaled as
    ``best`` grows (log-sum-exp), so every bank votes on one scale. Queries go in chunks of
    :data:`QUERY_CHUNK` voxels (the window x query arrays stay ~100 MB whatever the region).

    Returns:
        ``votes (n_classes, N) float32`` and ``searched (N,) bool`` for the ``N`` voxels of ``box`` (C order).
    """
    box_shape = tuple(b.stop - b.start for b in box)
    n_box = int(np.prod(box_shape))

    def to_box(flat: np.ndarray) -> torch.Tensor:
        idx = np.unravel_index(flat, shape)
        return torch.from_numpy(np.ravel_multi_index(tuple(i - b.start for i, b in zip(idx, box)), box_shape))

    best = torch.full((n_box,), -torch.inf)
    votes = torch.zeros((n_classes, n_box))
    searched = torch.zeros(n_box, dtype=torch.bool)
    for bank, (roi, base), (r, step) in zip(banks, regions, windows):
        for s in range(0, len(roi), QUERY_CHUNK):
            at = to_box(roi[s : s + QUERY_CHUNK])
            searched[at] = True
            query = torch.from_numpy(unit_rows(features.at_flat(roi[s : s + QUERY_CHUNK])))
            smax, sims, labels_of = _bank_votes(bank, query, base[s : s + QUERY_CHUNK], r, step)
            new_best = torch.maximum(best[at], smax)
            scale = torch.exp((best[at] - new_best) / h).nan_to_num(0.0)
            weight = torch.exp((sims - new_best) / h)
            bank_votes = torch.stack([(weight * (labels_of == c)).sum(0) for c in range(n_classes)])
            votes[:, at] = votes[:, at] * scale + bank_votes
            best[at] = new_best
    return votes.numpy(), searched.numpy()


