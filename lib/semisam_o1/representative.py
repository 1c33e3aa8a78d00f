"""Which image to annotate first: the pool's most representative image, from cheap thumbnails.

With one label, the labelled image is the template every other image is segmented from, so the
choice matters (a template far from the pool's typical anatomy or field of view costs Dice on
every image). Before any label there is no model and no uncertainty; what is left is similarity
between the images themselves. This module guarantees:

- :func:`thumbnail`: a ``(S**3,)`` float32 vector per image, zero mean and unit variance: the image
  normalised as the encoders see it (:func:`~semisam_o1.stage_one.normalize.normalize`), smoothed,
  and sampled on an axis-aligned world grid of ``S`` points per axis, ``step_mm`` apart, centred on
  the image's intensity centre of mass. Orientation and voxel size do not matter; the grid is the
  same physical size for every image of a pool (:func:`pool_step_mm`), so size differences count.
- :func:`distances`: ``1 - Pearson correlation`` between thumbnails, ``(N, N)`` in [0, 2].
- :func:`coverage_ranking`: greedy k-medoids (facility location). With no labelled image the
  winner is the pool's medoid (least mean distance to every other image); with labelled images,
  the candidate that most lowers the pool's mean distance to its nearest labelled-or-chosen image.

Cost: one image read and one smoothing per image (no encoder, no registration): about a second per
volume of 2 M voxels on 2 CPU cores; :class:`Thumbnails` keeps them per file (path, size, mtime).
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from semisam_o1.stage_one.normalize import normalize
from semisam_o1.volumes import InputError, Volume, load_image

#: Thumbnail points per axis.
THUMBNAIL_SIZE = 24


def field_of_view_mm(path: Path | str) -> float:
    """Largest physical extent (mm) of an image file, read from its header only."""
    header = nib.load(str(path)).header
    return float(max(n * z for n, z in zip(header.get_data_shape()[:3], header.get_zooms()[:3])))


def pool_step_mm(paths: list[Path | str], size: int = THUMBNAIL_SIZE) -> float:
    """The thumbnail grid step (mm) for a pool: the median field of view over ``size`` points, rounded to 0.5 mm
    (so the step, and with it the cached thumbnails, stay the same while the pool grows by a few images)."""
    median = float(np.median([field_of_view_mm(p) for p in paths]))
    return max(0.5, round(median / size * 2) / 2)


def thumbnail(image: Volume, modality: str, step_mm: float, size: int = THUMBNAIL_SIZE) -> np.ndarray:
    """``(size**3,)`` float32, zero mean and unit variance (all zeros for a constant image); see the module docstring."""
    norm = normalize(image.array, modality)
    spacing = np.asarray(image.spacing, float)
    norm = ndimage.gaussian_filter(norm, sigma=np.maximum(step_mm / spacing / 2.0, 0.0))
    total = float(norm.sum())
    centre = np.asarray(ndimage.center_of_mass(norm)) if total > 0 else (np.asarray(norm.shape) - 1) / 2.0
    centre_world = image.affine[:3, :3] @ centre + image.affine[:3, 3]
    offsets = (np.arange(size) - (size - 1) / 2.0) * step_mm
    world = np.stack(np.meshgrid(offsets, offsets, offsets, indexing="ij"), -1).reshape(-1, 3) + centre_world
    voxel = np.linalg.solve(image.affine[:3, :3], (world - image.affine[:3, 3]).T)
    values = ndimage.map_coordinates(norm, voxel, order=1, cval=0.0).astype(np.float32)
    std = float(values.std())
    return (values - values.mean()) / std if std > 0 else np.zeros_like(values)


def distances(thumbnails: np.ndarray) -> np.ndarray:
    """``(N, N)`` ``1 - correlation`` between rows of ``thumbnails`` ``(N, F)`` (each zero mean, unit variance).

    >>> a = np.array([1.0, -1.0, 1.0, -1.0]); distances(np.stack([a, a, -a])).round(2).tolist()
    [[0.0, 0.0, 2.0], [0.0, 0.0, 2.0], [2.0, 2.0, 0.0]]
    """
    t = np.asarray(thumbnails, np.float64)
    return np.clip(1.0 - (t @ t.T) / t.shape[1], 0.0, 2.0)


def coverage_ranking(d: np.ndarray, candidates: list[int], labelled: list[int]) -> dict[int, float]:
    """Mean distance of the pool to its nearest labelled image if each candidate were labelled next (lower is better).

    Args:
        d: ``(N, N)`` distances over the whole pool (:func:`distances`), labelled images included.
        candidates: indices that may be labelled next; labelled: indices already labelled (may be empty).

    Returns:
        ``{candidate: mean over the pool of min distance to labelled + [candidate]}``. With no label this is
        the candidate's mean distance to the pool, so the minimum is the pool's medoid.

    >>> d = np.array([[0.0, 0.2, 0.9], [0.2, 0.0, 0.8], [0.9, 0.8, 0.0]])
    >>> {i: round(v, 3) for i, v in coverage_ranking(d, [0, 1, 2], []).items()}  # image 1 is the medoid
    {0: 0.367, 1: 0.333, 2: 0.567}
    >>> {i: round(v, 3) for i, v in coverage_ranking(d, [0, 2], [1]).items()}  # with 1 labelled, 2 gains the pool more
    {0: 0.267, 2: 0.067}
    """
    nearest = d[:, labelled].min(1) if labelled else np.full(len(d), np.inf)
    return {c: float(np.minimum(nearest, d[:, c]).mean()) for c in candidates}


class Thumbnails:
    """Thumbnails of datastore images, computed once per file version (path, size, mtime) and grid step."""

    def __init__(self, modality: str, size: int = THUMBNAIL_SIZE):
        self.modality, self.size = modality, size
        self._cache: dict[tuple, np.ndarray] = {}
        self.unreadable: dict[str, str] = {}  #: ``{image_id: reason}`` of the last :meth:`of` call

    def of(self, paths: dict[str, Path | str], step_mm: float | None = None) -> tuple[list[str], np.ndarray]:
        """``(ids, (N, size**3) thumbnails)`` of the readable images of ``{image_id: file}``, sorted by id, on one grid
        (``step_mm`` default: :func:`pool_step_mm`); the others are left out and named in :attr:`unreadable`."""
        self.unreadable = {}
        readable = {}
        for i in sorted(paths):
            try:
                field_of_view_mm(paths[i])
                readable[i] = paths[i]
            except Exception as e:  # noqa: BLE001 - any unreadable header: named, left out
                self.unreadable[i] = f"{type(e).__name__}: {e}"
        step = (pool_step_mm(list(readable.values()), self.size) if readable else 1.0) if step_mm is None else step_mm
        ids, rows = [], []
        for i, p in readable.items():
            stat = Path(p).stat()
            key = (str(p), stat.st_size, stat.st_mtime_ns, step)
            if key not in self._cache:
                try:
                    self._cache[key] = thumbnail(load_image(p), self.modality, step, self.size)
                except InputError as e:
                    self.unreadable[i] = str(e)
                    continue
            ids.append(i)
            rows.append(self._cache[key])
        return ids, (np.stack(rows) if rows else np.zeros((0, self.size**3), np.float32))


def most_representative(paths: dict[str, Path | str], modality: str, labelled: tuple[str, ...] = (),
                        thumbnails: Thumbnails | None = None) -> list[tuple[str, float]]:
    """Readable candidates (``paths`` minus ``labelled``) ranked best first with their pool coverage cost (lower is better).

    Args:
        paths: ``{image_id: file}`` of the whole pool, labelled images included.
        modality: ``mri`` or ``ct`` (the plan's).
        labelled: ids already labelled (``final``).
        thumbnails: a cache to reuse; unreadable images are named in its :attr:`Thumbnails.unreadable`.
    """
    ids, t = (thumbnails or Thumbnails(modality)).of(paths)
    if not ids:
        return []
    index = {i: n for n, i in enumerate(ids)}
    costs = coverage_ranking(distances(t), [index[i] for i in ids if i not in labelled], [index[i] for i in labelled if i in index])
    return sorted(((ids[c], cost) for c, cost in costs.items()), key=lambda x: (x[1], x[0]))
