"""Which image to annotate first: the image the pool's other images align to best, from cheap thumbnails.

With one label, the labelled image is the template every other image is registered to and segmented from,
so the choice matters (a template far from the pool's typical anatomy, field of view or contrast costs Dice
on every image). Before any label there is no model and no uncertainty; what is left is how well the images
align to each other - stage one's own first step, done cheaply. This module guarantees:

- :func:`thumbnail`: a ``(S**3,)`` float32 vector per image: the image normalised as the encoders see it
  (:func:`~semisam_o1.stage_one.normalize.normalize`), smoothed, and sampled on an axis-aligned world grid
  of ``S`` points per axis, ``step_mm`` apart, centred on the image's intensity centre of mass; ``NaN``
  outside the image's field of view. Orientation and voxel size do not matter; the grid is the same
  physical size for every image of a pool (:func:`pool_step_mm`).
- :func:`aligned_distance`: ``1 - Pearson correlation`` of two thumbnails after an affine registration of
  one onto the other (SimpleITK, correlation metric), over the points inside both fields of
  view; in [0, 2]. Unregistered correlation is dominated by where each scan's field of view ends: a pool
  of cropped scans then crowns the image whose box is most typical, whatever its anatomy or contrast.
- :func:`distances`: ``(N, K)`` aligned distances of every image to ``K`` partners - the whole pool up to
  :data:`MAX_PARTNERS` images, else that many drawn with a fixed seed (:func:`partners`) - so a pool of
  ``N`` images costs ``N * K`` small registrations, not ``N**2``.
- :func:`coverage_ranking`: greedy k-medoids (facility location) over the partners. With no labelled
  image the winner is the pool's medoid (least mean distance to the partners); with labelled images, the
  candidate that most lowers the partners' mean distance to their nearest labelled-or-chosen image.

Cost: one image read and one smoothing per image, and ``N * K`` registrations of 24**3 points (measured
seconds per registration in the experiments log). :class:`Thumbnails` keeps thumbnails per file (path,
size, mtime) and distances per pair of them.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from semisam_o1.stage_one.normalize import normalize
from semisam_o1.volumes import InputError, Volume, load_image

#: Thumbnail points per axis.
THUMBNAIL_SIZE = 24
#: Pools up to this many images compare every pair; larger ones compare every image to this many partners.
MAX_PARTNERS = 24
#: Aligned thumbnails that share fewer points than this fraction of the grid are as far apart as can be (2.0).
MIN_OVERLAP = 0.1


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
    """``(size**3,)`` float32 normalised intensities, ``NaN`` outside the image (see the module docstring)."""
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
    inside = np.all((voxel >= -0.5) & (voxel <= np.asarray(norm.shape)[:, None] - 0.5), axis=0)
    return np.where(inside, values, np.float32(np.nan))


def _grid(values: np.ndarray) -> tuple[sitk.Image, sitk.Image]:
    """A thumbnail as a SimpleITK image (one unit per grid point, centred on 0; NaN as 0) and its field-of-view mask."""
    size = round(len(values) ** (1 / 3))
    cube = values.reshape(size, size, size)
    image = sitk.GetImageFromArray(np.nan_to_num(cube, nan=0.0).astype(np.float32))
    image.SetOrigin([-(size - 1) / 2.0] * 3)
    mask = sitk.GetImageFromArray(np.isfinite(cube).astype(np.uint8))
    mask.CopyInformation(image)
    return image, mask


def aligned_distance(fixed: np.ndarray, moving: np.ndarray, iterations: int = 60) -> float:
    """``1 - Pearson correlation`` of two :func:`thumbnail` s after an affine registration of ``moving`` onto ``fixed``,
    over the points inside both fields of view (2.0 where they share under :data:`MIN_OVERLAP` of the grid).

    >>> x = np.linspace(-1, 1, 12)
    >>> blob = np.exp(-((x[:, None, None] - 0.2) ** 2 + x[None, :, None] ** 2 + x[None, None, :] ** 2) * 4).ravel()
    >>> moved = np.exp(-((x[:, None, None] + 0.2) ** 2 + x[None, :, None] ** 2 + x[None, None, :] ** 2) * 4).ravel()
    >>> round(1 - float(np.corrcoef(blob, moved)[0, 1]), 2), aligned_distance(blob, moved) < 0.01  # a shift costs nothing
    (0.34, True)
    """
    (f, fmask), (m, mmask) = _grid(np.asarray(fixed, np.float32)), _grid(np.asarray(moving, np.float32))
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsCorrelation()
    reg.SetMetricFixedMask(fmask)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(0.5, 1e-3, iterations)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetInitialTransform(sitk.AffineTransform(3), inPlace=False)
    try:
        transform = reg.Execute(f, m)
    except RuntimeError:  # e.g. no overlap left: as far apart as can be
        return 2.0
    warped = sitk.GetArrayFromImage(sitk.Resample(m, f, transform, sitk.sitkLinear, 0.0)).ravel()
    inside = (sitk.GetArrayFromImage(sitk.Resample(mmask, f, transform, sitk.sitkNearestNeighbor, 0)).ravel() > 0) & (
        sitk.GetArrayFromImage(fmask).ravel() > 0)
    a, b = sitk.GetArrayFromImage(f).ravel()[inside], warped[inside]
    if inside.mean() < MIN_OVERLAP or a.std() == 0 or b.std() == 0:
        return 2.0
    return float(np.clip(1.0 - np.corrcoef(a, b)[0, 1], 0.0, 2.0))


def partners(n: int, limit: int = MAX_PARTNERS, seed: int = 0) -> list[int]:
    """The images every image is compared with: all ``n`` up to ``limit``, else ``limit`` drawn by ``default_rng(seed)``, sorted.

    >>> partners(5), partners(100, limit=4)
    ([0, 1, 2, 3, 4], [26, 50, 62, 82])
    """
    if n <= limit:
        return list(range(n))
    return sorted(int(i) for i in np.random.default_rng(seed).choice(n, size=limit, replace=False))


def distances(thumbnails: np.ndarray, partner_ids: list[int], known: dict | None = None) -> np.ndarray:
    """``(N, K)``: :func:`aligned_distance` of every row of ``thumbnails`` ``(N, F)`` (moved) onto each partner row (0 to itself).

    ``known``: ``{(i, k): distance}`` already computed (read and filled in).
    """
    known = {} if known is None else known
    for i in range(len(thumbnails)):
        for k in partner_ids:
            if i != k and (i, k) not in known:
                known[(i, k)] = aligned_distance(thumbnails[k], thumbnails[i])
    return np.array([[0.0 if i == k else known[(i, k)] for k in partner_ids] for i in range(len(thumbnails))])


def coverage_ranking(d: np.ndarray, candidates: list[int], labelled: list[int]) -> dict[int, float]:
    """Mean distance of the partners to their nearest labelled image if each candidate were labelled next (lower is better).

    Args:
        d: ``(N, K)`` distances of every image of the pool to the ``K`` partners (:func:`distances`; a square
            ``(N, N)`` when every image is a partner), labelled images included.
        candidates: row indices that may be labelled next; labelled: row indices already labelled (may be empty).

    Returns:
        ``{candidate: mean over the partners of min distance to labelled + [candidate]}``. With no label this is
        the candidate's mean distance to the partners, so the minimum is the pool's medoid.

    >>> d = np.array([[0.0, 0.2, 0.9], [0.2, 0.0, 0.8], [0.9, 0.8, 0.0]])
    >>> {i: round(v, 3) for i, v in coverage_ranking(d, [0, 1, 2], []).items()}  # image 1 is the medoid
    {0: 0.367, 1: 0.333, 2: 0.567}
    >>> {i: round(v, 3) for i, v in coverage_ranking(d, [0, 2], [1]).items()}  # with 1 labelled, 2 gains the pool more
    {0: 0.267, 2: 0.067}
    """
    nearest = d[labelled].min(0) if labelled else np.full(d.shape[1], np.inf)
    return {c: float(np.minimum(nearest, d[c]).mean()) for c in candidates}


class Thumbnails:
    """Thumbnails of datastore images, computed once per file version (path, size, mtime) and grid step, and their
    aligned distances, computed once per pair of those."""

    def __init__(self, modality: str, size: int = THUMBNAIL_SIZE):
        self.modality, self.size = modality, size
        self._cache: dict[tuple, np.ndarray] = {}
        self._pairs: dict[tuple, float] = {}
        self.unreadable: dict[str, str] = {}  #: ``{image_id: reason}`` of the last :meth:`of` call

    def of(self, paths: dict[str, Path | str], step_mm: float | None = None) -> tuple[list[str], np.ndarray]:
        """``(ids, (N, size**3) thumbnails)`` of the readable images of ``{image_id: file}``, sorted by id, on one grid
        (``step_mm`` default: :func:`pool_step_mm`); the others are left out and named in :attr:`unreadable`."""
        ids, rows, _ = self._read(paths, step_mm)
        return ids, rows

    def _read(self, paths: dict[str, Path | str], step_mm: float | None) -> tuple[list[str], np.ndarray, list[tuple]]:
        """:meth:`of`, and the cache key (file version and grid step) of each row."""
        self.unreadable = {}
        readable = {}
        for i in sorted(paths):
            try:
                field_of_view_mm(paths[i])
                readable[i] = paths[i]
            except Exception as e:  # noqa: BLE001 - any unreadable header: named, left out
                self.unreadable[i] = f"{type(e).__name__}: {e}"
        step = (pool_step_mm(list(readable.values()), self.size) if readable else 1.0) if step_mm is None else step_mm
        ids, rows, keys = [], [], []
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
            keys.append(key)
        return ids, (np.stack(rows) if rows else np.zeros((0, self.size**3), np.float32)), keys

    def pool_distances(self, paths: dict[str, Path | str]) -> tuple[list[str], np.ndarray]:
        """``(ids, (N, K) distances)`` of the readable images of ``{image_id: file}`` to their :func:`partners`
        (:func:`distances`), pairs computed before reused."""
        ids, t, keys = self._read(paths, None)
        sample = partners(len(ids))
        known = {(i, k): self._pairs[(keys[i], keys[k])] for i in range(len(ids)) for k in sample if (keys[i], keys[k]) in self._pairs}
        d = distances(t, sample, known=known)
        self._pairs.update({(keys[i], keys[k]): v for (i, k), v in known.items()})
        return ids, d


def most_representative(paths: dict[str, Path | str], modality: str, labelled: tuple[str, ...] = (),
                        thumbnails: Thumbnails | None = None) -> list[tuple[str, float]]:
    """Readable candidates (``paths`` minus ``labelled``) ranked best first with their pool coverage cost (lower is better).

    Args:
        paths: ``{image_id: file}`` of the whole pool, labelled images included.
        modality: ``mri`` or ``ct`` (the plan's).
        labelled: ids already labelled (``final``).
        thumbnails: a cache to reuse; unreadable images are named in its :attr:`Thumbnails.unreadable`.
    """
    ids, d = (thumbnails or Thumbnails(modality)).pool_distances(paths)
    if not ids:
        return []
    index = {i: n for n, i in enumerate(ids)}
    costs = coverage_ranking(d, [index[i] for i in ids if i not in labelled], [index[i] for i in labelled if i in index])
    return sorted(((ids[c], cost) for c, cost in costs.items()), key=lambda x: (x[1], x[0]))
