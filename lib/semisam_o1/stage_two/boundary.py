"""Pseudo-label borders snapped to the image's edges: a random walker (Grady, 2006) in a thin band.

Stage one's labels come from feature votes (features a few voxels apart), so their borders sit about a
voxel off the anatomy's intensity edges: on the hippocampus pool nearly all of stage one's error lies
within one voxel of the true border. :func:`snap_to_edges` keeps every voxel more than ``band`` voxels
inside a class, or outside all classes, as it is (the random walker's seeds) and lets
:func:`skimage.segmentation.random_walker` decide the voxels between them from the image's intensity
gradients: a band voxel takes the class whose seeds a random walk that avoids crossing edges reaches
first. Stage two trains its first round on the snapped labels (:class:`~semisam_o1.stage_two.rounds.StageTwo`).

Guarantees:

- only voxels within ``band`` voxels of a border of ``label`` can change (none inside a class's erosion
  by ``band``, none outside the foreground's dilation by ``band``); a class whose voxels all lie in the
  band (nothing left after erosion) keeps all its voxels;
- memory is bounded by ``max_voxels``, not by the image: the labels' bounding box is solved in slabs
  along the first axis, each with a ``HALO``-voxel overlap on both sides (the random walker's graph,
  sparse system and solver take ~500 bytes per slab voxel: :data:`SNAP_SLAB_BYTES`); a slab splits the
  band, so a voxel's result can differ from a whole-box solve's where the walk would leave the slab;
- the result is deterministic (a linear solve, no sampling).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from skimage.segmentation import random_walker

#: voxels of overlap on each side of a slab (the band is solved only where it has this much context)
HALO = 2
#: default :func:`snap_to_edges` ``max_voxels``
SLAB_VOXELS = 500_000
#: peak memory of one slab's solve at :data:`SLAB_VOXELS` (measured: ~500 bytes per slab voxel, the graph's
#: edges and weights, the sparse system and the solver's vectors)
SNAP_SLAB_BYTES = 600 * SLAB_VOXELS


def snap_to_edges(image: np.ndarray, label: np.ndarray, spacing=None, probs: np.ndarray | None = None, beta: float = 1000.0,
                  band: int = 1, max_voxels: int = SLAB_VOXELS) -> np.ndarray:
    """``label``'s class borders moved to ``image``'s edges within ``band`` voxels.

    Args:
        image: ``(D, H, W)`` float intensities (normalised; ``beta`` is relative to its standard deviation
            in each slab, as :func:`~skimage.segmentation.random_walker` scales it).
        label: ``(D, H, W)`` integer classes, 0 background.
        spacing: voxel size per axis (mm), ``None``: isotropic. Only the ratios count (gradients are taken
            per finest-axis voxel), so ``beta`` means the same on a 0.6 mm and a 1.5 mm scan.
        probs: optional ``(C, D, H, W)`` soft labels of ``label`` (C > ``label.max()``), changed in place:
            band voxels get the random walker's class probabilities, every other voxel keeps its own.
        beta: edge penalty (higher: borders cling harder to intensity edges).
        band: how far (voxels) a border may move; the seeds are ``label`` eroded (each class) and the
            background beyond the dilated foreground, by this many voxels.
        max_voxels: the most voxels solved at once (core + halo; at least ``1 + 2 * HALO`` planes of the box).

    Returns:
        the snapped label, ``(D, H, W)`` uint8.

    >>> img = np.zeros((12, 12, 12), np.float32); img[3:9, 3:9, 3:9] = 1.0   # a bright cube
    >>> lab = np.zeros((12, 12, 12), np.uint8); lab[3:8, 3:9, 3:9] = 1        # one slice short of it
    >>> int(snap_to_edges(img, lab).sum()), int(lab.sum())
    (216, 180)
    """
    out = np.asarray(label, np.uint8).copy()
    fg = out > 0
    if not fg.any():
        return out
    box = tuple(slice(max(s.start - band - HALO, 0), s.stop + band + HALO) for s in ndi.find_objects(fg.astype(np.uint8))[0])
    lab = out[box]
    seeds = np.zeros(lab.shape, np.uint8)  # 0: decide, 1: background, c + 1: class c
    seeds[~ndi.binary_dilation(lab > 0, iterations=band)] = 1
    for c in (int(v) for v in np.unique(lab) if v > 0):
        core = ndi.binary_erosion(lab == c, iterations=band)
        seeds[core if core.any() else lab == c] = c + 1
    if seeds.all():
        return out
    depth, plane = lab.shape[0], int(np.prod(lab.shape[1:]))
    core_depth = max(1, max_voxels // plane - 2 * HALO)
    img = image[box]
    rel_spacing = None if spacing is None else tuple(float(v) / min(spacing) for v in spacing)  # in units of the finest axis
    for z0 in range(0, depth, core_depth):
        z1 = min(z0 + core_depth, depth)
        lo, hi = max(z0 - HALO, 0), min(z1 + HALO, depth)
        s = seeds[lo:hi]
        if s.all():
            continue
        values = np.unique(s[s > 0])
        core = slice(z0 - lo, z1 - lo)
        decided = seeds[z0:z1] == 0
        # one class's seeds alone reach this slab's band: nothing to decide between. Else a direct solve
        # ("bf"): at this beta the band's system is ill-conditioned, and the iterative solvers' class
        # probabilities stop short of summing to one
        prob = (random_walker(np.asarray(img[lo:hi], np.float64), s.astype(np.int32), beta=beta, mode="bf", spacing=rel_spacing,
                              return_full_prob=True) if len(values) > 1 else np.ones((1, *s.shape)))
        snapped = (values[prob[:, core].argmax(0)] - 1).astype(np.uint8)
        lab[z0:z1][decided] = snapped[decided]
        if probs is not None:
            target = probs[(slice(None), *box)][:, z0:z1]
            target[:, decided] = 0
            for channel, value in zip(prob[:, core], values):
                target[value - 1][decided] = channel[decided]
    return out
