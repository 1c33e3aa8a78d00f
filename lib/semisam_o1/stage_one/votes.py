"""How stage one's fused class votes become a label: vote shares per voxel, smoothed and arg-maxed, or arg-maxed with
the classes the arg-max starves grown to their summed shares (``fusion_decision volume``).

Arrays are ``(C, ...)`` float32 shares (class 0 = background); outputs a uint8 class map and the float32 share of
the chosen class.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def _vote_shares(votes: np.ndarray, searched: np.ndarray, box_shape: tuple[int, ...], sigma,
                 volume_matched: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Per-class vote sums ``(C, N)`` float32 of the ``N`` box voxels -> arg-max class ``box_shape``
    uint8 and its share of the (smoothed) votes ``box_shape`` float32.

    Votes are normalised to shares per voxel (unsearched or vote-less voxels: all background), each
    class map Gaussian-smoothed with ``sigma`` voxels per axis (``None``: not smoothed), then arg-maxed
    (ties to the lower class, as ``argmax``; ``volume_matched``: :func:`volume_matched_argmax`). Works in
    place on ``votes``: besides it, two ``box_shape`` arrays and the uint8 output.
    """
    total = votes.sum(0)
    background = ~searched | (total <= 0)
    np.maximum(total, 1e-12, out=total)
    votes /= total  # a voxel without votes has all-zero votes: stays zero
    votes[0][background] = 1.0
    del background
    votes = votes.reshape(len(votes), *box_shape)
    if sigma is not None:
        for v in votes:
            ndimage.gaussian_filter(v, sigma, output=v)
    pred, top = volume_matched_argmax(votes) if volume_matched else _weighted_argmax(votes, np.ones(len(votes)))
    total = total.reshape(box_shape)
    np.sum(votes, 0, out=total)
    np.maximum(total, 1e-6, out=total)
    top /= total
    return pred, top


def _weighted_argmax(shares: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``argmax_c weights[c] * shares[c]`` of ``(C, ...)`` shares (ties to the lower class) as uint8, and the
    unweighted share of the chosen class, float32; one class map at a time (with all weights 1: one float32
    and one bool array of a map's size besides the output, as a plain arg-max)."""
    unweighted = bool(np.all(weights == 1))
    pred = np.zeros(shares.shape[1:], np.uint8)
    top = shares[0] * np.float32(weights[0])
    value = None if unweighted else shares[0].copy()
    for c in range(1, len(shares)):
        scaled = shares[c] if weights[c] == 1 else shares[c] * np.float32(weights[c])
        better = scaled > top
        pred[better] = c
        if value is not None:
            value[better] = shares[c][better]
        np.maximum(top, scaled, out=top)
    return pred, (top if value is None else value)


def volume_matched_argmax(shares: np.ndarray, starved: float = 0.95, iterations: int = 30,
                          tolerance: float = 0.005) -> tuple[np.ndarray, np.ndarray]:
    """Arg-max class map of ``(C, ...)`` per-voxel class shares (class 0 = background), in which a foreground
    class the arg-max starves grows to its expected volume (the sum of its shares); no class is shrunk on purpose.

    The arg-max of averaged votes gives a class only the voxels where it wins: along a thin class's
    border, where its share is below one half on both sides, it loses more voxels than it gains, so
    fusing several mappings or templates shrinks thin classes, while a bulky class gains (measured per
    dataset: docs/experiments.md, ``propagation.decision``). A foreground class is *starved* when the arg-max gives it fewer than
    ``starved`` x its expected volume (an expected volume under one voxel never is). Only starved classes'
    shares are scaled, by one factor ``w_c >= 1`` each (a class prior shift), before the arg-max; the
    factors are found by fixed-point steps ``w_c <- max(1, w_c * sqrt(expected_c / voxels_c))`` (each ratio
    clipped to [0.5, 2]) until every starved class is within ``tolerance`` (relative) of its expected volume
    or ``iterations`` steps have run. Without a starved class the result is the plain arg-max.

    Returns, as :func:`_weighted_argmax`, ``(...)`` uint8 class map and ``(...)`` float32 share of its class:
    of the steps taken, the one whose worst starved-class volume error is smallest.
    Example: class 1 shares ``[.45, .4, .3, .1]`` (background the rest) sum to 1.25 voxels, and the arg-max
    gives it none; here the map is ``[1, 0, 0, 0]``.
    """
    n_classes = len(shares)
    expected = shares.reshape(n_classes, -1).sum(1, dtype=np.float64)
    weights = np.ones(n_classes)
    step = _weighted_argmax(shares, weights)
    counts = np.bincount(step[0].reshape(-1), minlength=n_classes).astype(np.float64)
    grow = (np.arange(n_classes) > 0) & (expected >= 1.0) & (counts < starved * expected)
    best, best_error = step, np.inf
    for _ in range(iterations):
        error = float(np.max(np.abs(counts[grow] - expected[grow]) / expected[grow])) if grow.any() else 0.0
        if error < best_error:
            best, best_error = step, error
        if error <= tolerance:
            break
        ratio = np.clip(expected / np.maximum(counts, 1.0), 0.5, 2.0)
        weights[grow] = np.maximum(1.0, weights[grow] * np.sqrt(ratio[grow]))
        step = _weighted_argmax(shares, weights)
        counts = np.bincount(step[0].reshape(-1), minlength=n_classes).astype(np.float64)
    return best
