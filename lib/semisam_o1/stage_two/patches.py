"""Stage two's training patches: :class:`PatchSampler` reads one random patch per case straight from (memory-mapped)
volumes, :func:`augmentation` is the MONAI transform chain applied to it, and :func:`mirror_axes` /
:func:`slice_axis` say along which axes mirroring and in-plane rotation are safe.

Volumes are ``(D, H, W)`` float32 in [0, 1] (already normalised); labels ``(D, H, W)`` int.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from monai.transforms import Compose, RandAffined, RandFlipd, RandScaleIntensityd, RandShiftIntensityd

from semisam_o1.choices import AUGMENTATIONS
from semisam_o1.stage_two.params import TrainParams

#: ``augment="affine"``: each patch is rotated about each axis (in-plane only on thick slices) by up to this many
#: degrees and scaled by up to this fraction (1 +/- 0.15), with probability :data:`AFFINE_PROB`
ROTATE_DEGREES, SCALE, AFFINE_PROB = 15.0, 0.15, 0.5


#: ``augment="affine"``: patches are read this much larger than ``TrainParams.patch`` and the affine resamples the
#: centre at the patch size, so rotated and shrunk patches show anatomy in their corners, not padding
AFFINE_MARGIN = 1.5


class PatchSampler(Sequence):
    """One random training patch per case and access: ``{"image": (1, *patch) float32, "label": (1, *patch) uint8}``.

    What MONAI's ``SpatialPadd`` + ``RandCropByPosNegLabeld(pos=2, neg=1)`` do, reading only the patch:
    MONAI's crop first turns the whole volume into a tensor, i.e. the whole pool into memory, once per
    step. A patch is centred on a foreground voxel (label > 0) with probability ``pos / (pos + neg)``,
    else on a background voxel, moved so that it lies inside the volume; a volume smaller than the patch
    is zero-padded evenly on both sides. Candidate centres: a uniform sample of at most ``max_points``
    foreground and as many background voxels per case, found slab by slab (never a whole-volume copy).
    With ``context`` (voxels per side and axis) the patch comes with that much of its surroundings, zero
    outside the volume: ``patch + 2 * context`` voxels whose centre is exactly the patch it would be without
    (what ``augment="affine"`` rotates and scales about).

    Args:
        images: (D, H, W) arrays in [0, 1] (``np.memmap`` welcome); labels: (D, H, W) integer arrays.
    """

    def __init__(self, images: Sequence[np.ndarray], labels: Sequence[np.ndarray], patch: Sequence[int],
                 pos: int = 2, neg: int = 1, seed: int = 0, max_points: int = 20000, context: Sequence[int] = (0, 0, 0)):
        self.images, self.labels, self.patch = list(images), list(labels), tuple(int(p) for p in patch)
        self.context = tuple(int(m) for m in context)
        self.p_pos = pos / (pos + neg)
        self.rng = np.random.default_rng(seed)
        self.points = [self._centres(lab, max_points) for lab in self.labels]

    def __len__(self) -> int:
        return len(self.images)

    def _centres(self, label: np.ndarray, max_points: int, slab: int = 8) -> tuple[np.ndarray, np.ndarray]:
        """(foreground, background) flat voxel indices, each a uniform sample of at most ``max_points``."""
        counts = [int(np.count_nonzero(label[z:z + slab])) for z in range(0, label.shape[0], slab)]
        n_fg, n_bg = sum(counts), label.size - sum(counts)
        rates = (min(1.0, max_points / max(1, n_fg)), min(1.0, max_points / max(1, n_bg)))
        fg, bg, per_slab = [], [], int(np.prod(label.shape[1:]))
        for z in range(0, label.shape[0], slab):
            flat = np.asarray(label[z:z + slab]).reshape(-1) > 0
            for out, where, rate in ((fg, flat, rates[0]), (bg, ~flat, rates[1])):
                idx = np.flatnonzero(where)
                out.append(idx[self.rng.random(len(idx)) < rate] + z * per_slab)
        return np.concatenate(fg), np.concatenate(bg)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        image, label = self.images[i], self.labels[i]
        fg, bg = self.points[i]
        pool = fg if (len(fg) and self.rng.random() < self.p_pos) or not len(bg) else bg
        centre = np.unravel_index(int(pool[self.rng.integers(len(pool))]), label.shape)
        # the patch's first voxel per axis: inside the volume, or (volume smaller than the patch) centred on it
        start = [min(max(c - p // 2, 0), n - p) if n >= p else -((p - n) // 2) for c, p, n in zip(centre, self.patch, label.shape)]
        lo = [s - m for s, m in zip(start, self.context)]
        hi = [s + p + m for s, p, m in zip(start, self.patch, self.context)]
        box = tuple(slice(max(a, 0), min(b, n)) for a, b, n in zip(lo, hi, label.shape))
        x, y = np.asarray(image[box], np.float32), np.asarray(label[box], np.uint8)
        pad = [(max(0, -a), max(0, b - n)) for a, b, n in zip(lo, hi, label.shape)]
        if any(sum(w) for w in pad):
            x, y = np.pad(x, pad), np.pad(y, pad)
        return {"image": x[None], "label": y[None]}


def augmentation(params: TrainParams) -> Compose:
    """The random transforms of every training patch ``{"image": (1, D, H, W) float32, "label": (1, D, H, W)}``.

    ``augment="flip"``: mirroring along each of ``params.flip_axes`` (probability 0.5 each) and intensity
    scaling and shifting (+/- 0.1, probability 0.5 each); the patch keeps its size. ``augment="affine"``: first,
    with probability :data:`AFFINE_PROB`, a rotation by up to :data:`ROTATE_DEGREES` about each axis and a
    scaling by 1 +/- :data:`SCALE` along each axis (with ``params.slice_axis``: rotation about that axis only and
    scaling along the other two, so each output slice is one input slice), MONAI ``RandAffined`` (image
    trilinear, label nearest, zeros outside) resampling the centre at ``params.patch``'s size: the patches it gets
    come with :func:`patch_context` around them (:func:`sampled_patch` in all), and without the affine the patch
    itself is cut out unchanged. Label values are never interpolated.

    >>> params = TrainParams(augment="affine")
    >>> patch = {"image": np.zeros((1, *sampled_patch(params)), np.float32), "label": np.zeros((1, *sampled_patch(params)), np.uint8)}
    >>> sampled_patch(params), tuple(augmentation(params)(patch)["label"].shape)
    ((48, 48, 48), (1, 32, 32, 32))
    """
    if params.augment not in AUGMENTATIONS:
        raise ValueError(f"augment must be one of {AUGMENTATIONS}, got {params.augment!r}")
    keys = ["image", "label"]
    spatial = []
    if params.augment == "affine":
        turn, axis = math.radians(ROTATE_DEGREES), params.slice_axis
        rotate = [turn if axis is None or a == axis else 0.0 for a in range(3)]
        scale = [SCALE if axis is None or a != axis else 0.0 for a in range(3)]
        spatial.append(RandAffined(keys, spatial_size=params.patch, prob=AFFINE_PROB, mode=("bilinear", "nearest"), padding_mode="zeros",
                                   rotate_range=rotate, scale_range=scale))
    transform = Compose(
        [
            *spatial,
            *(RandFlipd(keys, prob=0.5, spatial_axis=axis) for axis in params.flip_axes),
            RandScaleIntensityd("image", factors=0.1, prob=0.5),
            RandShiftIntensityd("image", offsets=0.1, prob=0.5),
        ]
    )
    transform.set_random_state(seed=params.seed)
    return transform


def patch_context(params: TrainParams) -> tuple[int, ...]:
    """Voxels of surroundings read on each side of a training patch: none, or with ``augment="affine"`` enough
    for a patch :data:`AFFINE_MARGIN` x as large (8 per side of a 32-voxel patch)."""
    if params.augment != "affine":
        return (0,) * len(params.patch)
    return tuple(int(math.ceil(p * (AFFINE_MARGIN - 1) / 2)) for p in params.patch)


def sampled_patch(params: TrainParams) -> tuple[int, ...]:
    """The size training patches are read at, :func:`augmentation`'s input: ``params.patch`` plus
    :func:`patch_context` on both sides."""
    return tuple(p + 2 * m for p, m in zip(params.patch, patch_context(params)))


def slice_axis(spacing: Sequence[float], anisotropy: float = 2.0) -> int | None:
    """The thick-slice axis of a grid with voxel ``spacing`` (mm, per axis of D, H, W): its coarsest axis when that is
    more than ``anisotropy`` x its finest, else None (near-isotropic). ``augment="affine"`` rotates and scales only in
    the plane of the other two axes there (as nnU-Net does for anisotropic data).

    >>> slice_axis((1.0, 1.0, 1.0)), slice_axis((7.7, 2.5, 2.5)), slice_axis((1.25, 1.25, 2.0))
    (None, 0, None)
    """
    spacing = [float(s) for s in spacing]
    return int(np.argmax(spacing)) if max(spacing) > anisotropy * min(spacing) else None


def mirror_axes(labels: Sequence[np.ndarray], n_classes: int) -> tuple[int, ...]:
    """The spatial axes along which mirroring keeps every class on itself in every label map (D, H, W).

    Along an axis where a class's mirror image lands more on another foreground class than on itself
    (left/right kidney, hippocampus head/tail along its long axis), a mirrored patch shows one class in the
    shape of the other: flipping there in training or TTA teaches and averages the wrong class.

    >>> pair = np.zeros((1, 1, 8), np.uint8); pair[..., 1:3], pair[..., 5:7] = 1, 2  # a left and a right class
    >>> mirror_axes([pair], 3)
    (0, 1)
    """
    keep = []
    for axis in range(3):
        ok = True
        for label in labels:
            label = np.asarray(label)
            mirrored = np.flip(label, axis)
            overlap = np.bincount((mirrored.astype(np.int64) * n_classes + label).ravel(), minlength=n_classes * n_classes)
            overlap = overlap.reshape(n_classes, n_classes)  # [class mirrored, class there]
            for c in range(1, n_classes):
                others = max((overlap[c, d] for d in range(1, n_classes) if d != c), default=0)
                ok &= not (overlap[c].sum() and others > overlap[c, c])
        if ok:
            keep.append(axis)
    return tuple(keep)
