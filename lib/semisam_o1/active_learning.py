"""Which unlabelled volume a clinician should label next: uncertainty scores, pool diversity, serving rules.

Pure functions over arrays and datastore info dicts; the MONAI Label scoring method and strategies
(:mod:`semisam_o1.tasks.uncertainty_scoring`, :mod:`semisam_o1.tasks.strategies`) and the curation
benchmark use them alike.

- :func:`uncertainty_score`: one number per volume from a voxel uncertainty map, taken over the
  predicted structure and its border (so large volumes of confident background do not dilute it).
- :func:`volume_descriptor` / :func:`distance_to_labelled`: per-volume global foundation features and
  k-center-greedy distances (the volume farthest from every labelled one covers the pool best).
- :func:`uncertain_then_diverse`: the ``uncertain_diverse`` ranking: the most uncertain quarter of
  the pool first, the farthest from the labelled volumes among them.
- :func:`recently_served`: MONAI Label records ``{"ts", "client_id"}`` per strategy in the image
  info when it serves an image; another client does not get it again within the skip window.
"""

from __future__ import annotations

import time

import numpy as np
from scipy import ndimage

#: Image-info key of the uncertainty score written by the ``uncertainty`` scoring method.
SCORE_KEY = "semisam_uncertainty"

#: A network voxel is uncertain above this predictive entropy (nats; ln 3 = 1.10 is the maximum for 3 classes).
UNCERTAIN_ENTROPY = 0.3

#: A stage-one voxel is uncertain when the winning class holds less than 70 % of the smoothed votes.
UNCERTAIN_VOTE = 0.3

#: Voxels around the predicted structure that count for the score (its uncertain border).
BORDER_VOXELS = 2

#: ``uncertain_diverse`` picks among this fraction of the scored candidates, the most uncertain ones.
SHORTLIST_FRACTION = 0.25


def uncertainty_score(uncertainty: np.ndarray, label: np.ndarray, threshold: float) -> dict[str, float]:
    """Summary of a voxel uncertainty map ``(D, H, W)`` for ranking volumes.

    Args:
        uncertainty: per-voxel uncertainty (entropy in nats, or 1 - vote share for stage one).
        label: predicted label map ``(D, H, W)``; its foreground dilated by :data:`BORDER_VOXELS`
            is the region scored (the whole volume when nothing is predicted).
        threshold: a voxel above it counts as uncertain.

    Returns:
        ``score`` (mean uncertainty over the region, what strategies rank by), ``mean_uncertainty``
        (whole volume) and ``uncertain_fraction`` (whole volume).
    """
    region = ndimage.binary_dilation(label > 0, iterations=BORDER_VOXELS)
    if not region.any():
        region = np.ones(label.shape, bool)
    return {
        "score": round(float(uncertainty[region].mean()), 5),
        "mean_uncertainty": round(float(uncertainty.mean()), 5),
        "uncertain_fraction": round(float((uncertainty > threshold).mean()), 5),
    }


def volume_descriptor(features) -> np.ndarray:
    """Global descriptor ``(2C,)`` float32 of a volume's stored features (a
    :class:`~semisam_o1.stage_one.feature_cache.FeatureGrid`, or dense ``(C, D, H, W)``): per-channel mean and std."""
    from semisam_o1.stage_one.feature_cache import as_grid

    flat = as_grid(features).sample()
    return np.concatenate([flat.mean(0), flat.std(0)])


def distance_to_labelled(candidates: np.ndarray, labelled: np.ndarray) -> np.ndarray:
    """Euclidean distance ``(N,)`` of each candidate descriptor to its nearest labelled one.

    Descriptors are standardised per dimension over candidates and labelled together first.
    With no labelled volume, the distance to the pool's mean is returned negated, so the most
    typical volume (the best single template) ranks first.

    Args:
        candidates: ``(N, F)``; labelled: ``(M, F)``, M may be 0.
    """
    both = np.concatenate([candidates, labelled]) if len(labelled) else candidates
    mean, std = both.mean(0), both.std(0) + 1e-6
    c = (candidates - mean) / std
    if not len(labelled):
        return -np.linalg.norm(c, axis=1)
    lab = (labelled - mean) / std
    return np.linalg.norm(c[:, None] - lab[None], axis=2).min(1)


def uncertain_then_diverse(scores: list[float | None], distances: np.ndarray,
                           fraction: float = SHORTLIST_FRACTION) -> list[tuple[float, str]]:
    """Rank candidates by uncertainty first, diversity second: ``[(value, why)]`` per candidate, the
    highest value is served.

    The shortlist is the ``ceil(fraction * scored)`` most uncertain scored candidates (at least 2, or all
    when fewer); within it the candidate farthest from the labelled volumes wins (value ``1 + distance``
    scaled to [0, 1] over the shortlist). Outside the shortlist, candidates rank by uncertainty
    (value in [0, 1)); unscored ones come last (negative). A product of the two scaled terms does not
    work: the distance spreads over [0, 1] while uncertainty scores of one pool differ by a few
    percent, so the product picks what distance alone picks.

    Args:
        scores: uncertainty score per candidate (``None``: not scored yet); distances: ``(N,)`` to the
            nearest labelled volume (:func:`distance_to_labelled`).

    >>> [round(v, 2) for v, _ in uncertain_then_diverse([0.9, 0.8, 0.1, None], np.array([0.0, 1.0, 9.0, 5.0]))]
    [1.0, 2.0, 0.11, -0.72]
    """
    scored = [i for i, s in enumerate(scores) if s is not None]
    n = min(len(scored), max(2, int(np.ceil(fraction * len(scored)))))
    shortlist = sorted(scored, key=lambda i: (-scores[i], i))[:n]
    top = max((scores[i] for i in scored), default=0.0) or 1.0
    d = np.asarray(distances, float)
    lo, hi = (d[shortlist].min(), d[shortlist].max()) if shortlist else (0.0, 0.0)
    out = []
    for i, score in enumerate(scores):
        if score is None:
            out.append((-1.0 + float(d[i] - d.min()) / (float(np.ptp(d)) or 1.0) * 0.5, "no uncertainty score yet; farthest first"))
        elif i in shortlist:
            near = (d[i] - lo) / (hi - lo) if hi > lo else 1.0
            out.append((1.0 + float(near), f"among the {n} most uncertain (score {score}), farthest from the labelled volumes (distance {d[i]:.2f})"))
        else:
            out.append((0.99 * score / top, f"uncertainty {score}, not among the {n} most uncertain"))
    return out


def recently_served(image_info: dict, client_id: str | None, window_seconds: float, now: float | None = None) -> bool:
    """Whether any strategy served this image to *another* client less than ``window_seconds`` ago.

    A request without ``client_id`` counts as another client for every earlier serving.
    """
    now = time.time() if now is None else now
    for served in image_info.get("strategy", {}).values():
        other = client_id is None or served.get("client_id") != client_id
        if other and now - served.get("ts", 0) < window_seconds:
            return True
    return False
