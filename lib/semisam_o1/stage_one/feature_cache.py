"""Foundation features computed once per image and kept on disk inside the datastore.

Layout (one folder per setting, so changing the encoder or its settings never mixes features)::

    <studies>/.semisam/features/<settings id>/
        basis.npz                 PCA basis: mean (C,), components (C, dims) of L2-normalised
                                  encoder features (C = 256 x axes), fitted once per setting
        <image sha256[:20]>.npy   float16 (d, h, w, dims): the features of every ``stride``-th voxel
                                  (d = ceil(D / stride_D), ...), channel-last

The settings id joins the encoder id (architecture, weights hash, input size, axes), the intensity
normalisation, the stored dimension and the plan's feature-grid rule (:class:`~semisam_o1.stage_one.plan.Plan`),
so any change invalidates the cache; the file name is the image's content hash, so an image replaced
under the same name is encoded again. Files are written atomically.

Memory: an image is encoded axis by axis in slice batches, and each batch is projected into the
stored space at once: the L2 norm of a voxel's concatenated feature is ``sqrt(sum_a |x_a|^2)`` and
its projection ``sum_a x_a @ W_a``, so extraction holds ``dims + 1`` floats per stored voxel, never
the ``256 x axes`` channels of the raw features.

The PCA basis is fitted from the first image encoded with a setting, on a lattice of voxels
(every ``m``-th stored voxel along each axis, ~20 k voxels) whose full feature vectors come from
encoding only the lattice's slices. A file lock serialises the fit: two processes (the server and a
background job) that start at once use one basis.

Lookup: :class:`FeatureGrid` gives features at any voxel by trilinear interpolation of the stored
grid (exact at stored voxels).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import torch
from filelock import FileLock
from tqdm import tqdm

from semisam_o1.stage_one.encoders import EncoderSpec, SliceEncoder
from semisam_o1.stage_one.normalize import normalization_id, normalize
from semisam_o1.stage_one.plan import Plan, with_cpu_fallback
from semisam_o1.volumes import (
    Volume,
    atomic_write,
    check_memory,
    load_array,
    load_arrays,
    remove_interrupted_writes,
    sha256,
)

logger = logging.getLogger(__name__)


def unit_rows(x: np.ndarray) -> np.ndarray:
    """``x`` of shape (..., C) as a new float32 array whose length-C vectors have unit L2 norm (FAISS
    ``normalize_L2``; a zero vector stays zero). Every feature comparison uses this cosine geometry: the dot
    product of two unit rows is their cosine similarity. ``x`` itself is left unchanged.

    Example: ``unit_rows([[3, 4], [0, 0]])`` is ``[[0.6, 0.8], [0, 0]]``.
    """
    shape = np.shape(x)
    rows = np.array(x, dtype=np.float32, order="C").reshape(-1, shape[-1])
    faiss.normalize_L2(rows)
    return rows.reshape(shape)

CACHE_DIR = Path(".semisam") / "features"
#: Voxels of the lattice the PCA basis is fitted on (about; the lattice is regular).
PCA_FIT_VOXELS = 20000
#: Memory of the encoder network and one slice batch (bytes), for the memory check before encoding.
ENCODER_BYTES = 1 << 30
#: Points interpolated per chunk in :meth:`FeatureGrid.at` (bounds its temporary memory).
LOOKUP_CHUNK = 1 << 18


@dataclass
class FeatureGrid:
    """Stored features of one image and how to read them at any voxel.

    Attributes:
        values: ``(d, h, w, C)`` float16 or float32 (a memory map for cached files): the features of
            voxels ``(i * stride[0], j * stride[1], k * stride[2])``.
        stride: voxels between stored samples along each axis.
        shape: the image's own shape ``(D, H, W)``.
    """

    values: np.ndarray
    stride: tuple[int, int, int]
    shape: tuple[int, int, int]

    @classmethod
    def from_dense(cls, features: np.ndarray) -> "FeatureGrid":
        """Wrap a dense ``(C, D, H, W)`` feature volume (stride 1)."""
        features = np.asarray(features)
        return cls(np.moveaxis(features, 0, -1), (1, 1, 1), tuple(features.shape[1:]))

    @property
    def channels(self) -> int:
        return int(self.values.shape[-1])

    def at(self, voxels: np.ndarray) -> np.ndarray:
        """Features ``(N, C)`` float32 at voxel indices ``voxels`` ``(N, 3)`` (integer or continuous).

        Trilinear between stored samples; positions outside the image are clamped to its border.
        """
        voxels = np.asarray(voxels)
        out = np.empty((len(voxels), self.channels), np.float32)
        size = np.array(self.values.shape[:3])
        stride = np.array(self.stride, np.float64)
        flat = self.values.reshape(-1, self.channels)
        if np.all(stride == 1) and np.issubdtype(voxels.dtype, np.integer):
            for s in range(0, len(voxels), LOOKUP_CHUNK):
                idx = np.clip(voxels[s : s + LOOKUP_CHUNK], 0, size - 1)
                out[s : s + LOOKUP_CHUNK] = flat[np.ravel_multi_index(idx.T, size)]
            return out
        for s in range(0, len(voxels), LOOKUP_CHUNK):
            u = np.clip(voxels[s : s + LOOKUP_CHUNK] / stride, 0, size - 1)
            lo = np.minimum(np.floor(u).astype(np.int64), np.maximum(size - 2, 0))
            t = (u - lo).astype(np.float32)
            acc = np.zeros((len(u), self.channels), np.float32)
            for corner in np.ndindex(2, 2, 2):
                c = np.array(corner)
                weight = np.prod(np.where(c, t, 1 - t), 1)
                idx = np.minimum(lo + c, size - 1)
                acc += weight[:, None] * flat[np.ravel_multi_index(idx.T, size)]
            out[s : s + LOOKUP_CHUNK] = acc
        return out

    def at_flat(self, flat_index: np.ndarray) -> np.ndarray:
        """Features ``(N, C)`` float32 at flat (C-order) indices of the image's own ``(D, H, W)`` grid."""
        return self.at(np.stack(np.unravel_index(np.asarray(flat_index), self.shape), -1))

    def dense(self) -> np.ndarray:
        """All voxels, ``(C, D, H, W)`` float32 (small volumes: C x D x H x W floats)."""
        return self.at_flat(np.arange(int(np.prod(self.shape)))).T.reshape(self.channels, *self.shape)

    def sample(self) -> np.ndarray:
        """The stored samples ``(n, C)`` float32 (e.g. for per-volume statistics)."""
        return np.asarray(self.values, np.float32).reshape(-1, self.channels)


def as_grid(features) -> FeatureGrid:
    """A :class:`FeatureGrid` as is; a dense ``(C, D, H, W)`` array wrapped as one (stride 1)."""
    return features if isinstance(features, FeatureGrid) else FeatureGrid.from_dense(features)


def stored_grid(shape: tuple[int, ...], stride: tuple[int, ...]) -> list[np.ndarray]:
    """Voxel indices stored along each axis: ``[0, s, 2s, ...]`` below the axis length."""
    return [np.arange(0, n, s) for n, s in zip(shape, stride)]


def save_float16(path: Path, values: np.ndarray, slab_bytes: int = 1 << 26) -> Path:
    """``np.save(path, values.astype(np.float16))`` without the float16 copy in memory: the ``.npy``
    header, then ``values`` converted and written a slab (axis 0) of about ``slab_bytes`` at a time."""
    step = max(1, slab_bytes // max(1, values[:1].nbytes))
    with open(path, "wb") as f:
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float16)), "fortran_order": False, "shape": values.shape}
        np.lib.format.write_array_header_1_0(f, header)
        for start in range(0, len(values), step):
            f.write(np.ascontiguousarray(values[start : start + step], dtype=np.float16).tobytes())
    return Path(path)


class FeatureCache:
    """Encoded, PCA-compressed features of images, keyed by content hash and settings.

    Args:
        studies: the datastore folder; the cache lives under ``studies/.semisam/features``.
        encoder: which encoder; it is built (weights loaded) only on the first cache miss.
        dims: stored feature dimension after PCA (32 -> 64 bytes per stored voxel in float16).
        modality: intensity normalisation (``mri``/``ct``).
        plan: the datastore's :class:`~semisam_o1.stage_one.plan.Plan` (feature stride); default stride 2.
        device: where the encoder runs (``cpu``, ``cuda``, ``cuda:N``).
    """

    def __init__(self, studies: Path, encoder: EncoderSpec = EncoderSpec(), dims: int = 32, modality: str = "mri",
                 plan: Plan | None = None, device: str = "cpu"):
        self.dims = dims
        self.modality = modality
        self.plan = plan or Plan(encoder_image_size=encoder.image_size)
        self.settings_id = f"{encoder.id}-{normalization_id(modality)}-l2pca{dims}-{self.plan.id}"
        self.root = Path(studies) / CACHE_DIR / self.settings_id
        self.spec = encoder
        self.device = device
        self._encoder: SliceEncoder | None = None
        self._basis: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def encoder(self) -> SliceEncoder:
        if self._encoder is None:
            self._encoder = self.spec.build(self.device)
        return self._encoder

    def path(self, image_path: Path) -> Path:
        return self.root / f"{sha256(image_path)[:20]}.npy"

    def stride(self, image: Volume) -> tuple[int, int, int]:
        return self.plan.stride(image.spacing)

    def get(self, image: Volume) -> FeatureGrid | None:
        """Cached features of ``image``, or ``None`` on a miss."""
        path = self.path(image.path)
        if not path.exists():
            return None
        stride = self.stride(image)
        values = load_array(path)
        expected = (*[len(a) for a in stored_grid(image.array.shape, stride)], self.dims)
        if values.shape != expected:
            logger.warning(f"{path}: cached shape {values.shape} does not fit {image.path} ({expected}); encoding again")
            return None
        return FeatureGrid(values, stride, tuple(image.array.shape))

    def get_or_compute(self, image: Volume, progress: bool = False) -> FeatureGrid:
        """Features of ``image``: from disk, or encoded, compressed and stored."""
        cached = self.get(image)
        if cached is not None:
            return cached
        path = self.path(image.path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(f"{path}.lock"):  # one encoder per image: another process or thread may be encoding it
            cached = self.get(image)
            if cached is not None:
                return cached
            stored = np.prod([len(g) for g in stored_grid(image.array.shape, self.stride(image))])
            # the image (+ its normalised copy) and (dims + 1) float32 accumulators per stored voxel
            check_memory(f"{image.path}: encoding", image.array.shape, 8 + (self.dims + 1) * 4 * stored / image.array.size, ENCODER_BYTES)
            values = with_cpu_fallback(lambda device: self.compute(image, progress, device), self.device, f"encoding {image.path.name}")
            remove_interrupted_writes(path)  # a writer killed before us (e.g. a Ray worker that died) left its temporary file
            atomic_write(path, lambda tmp: save_float16(tmp, values))
            del values
        return self.get(image)

    # ----------------------------------------------------------------- encoding
    def compute(self, image: Volume, progress: bool = False, device: str | None = None) -> np.ndarray:
        """Encode ``image``: ``(d, h, w, dims)`` float32, streamed per axis and slice batch and projected at
        once, on ``device`` (default the cache's). Its features are not written (the basis is, if missing)."""
        volume = torch.from_numpy(normalize(image.array, self.modality))
        grid = stored_grid(volume.shape, self.stride(image))
        mean, components = self._load_or_fit_basis(volume, grid, progress)
        enc = self.encoder.to(device or self.device)
        acc = np.zeros((*[len(g) for g in grid], self.dims), np.float32)
        sq = np.zeros(acc.shape[:3], np.float32)
        total = sum(len(grid[a]) for a in enc.axes)
        with tqdm(total=total, desc=f"encode {image.path.name}", unit="slice", disable=not progress, leave=False) as bar:
            for n, axis in enumerate(enc.axes):
                w = torch.from_numpy(components[n * enc.channels_per_axis : (n + 1) * enc.channels_per_axis]).to(enc.device)
                acc_axis, sq_axis = np.moveaxis(acc, axis, 0), np.moveaxis(sq, axis, 0)
                rest = [g for i, g in enumerate(grid) if i != axis]
                for start, feats in enc.slice_features(volume, axis, grid[axis], *rest, bar=bar):
                    stop = start + len(feats)
                    acc_axis[start:stop] += torch.einsum("bcrs,cd->brsd", feats, w).cpu().numpy()
                    sq_axis[start:stop] += (feats * feats).sum(1).cpu().numpy()
        acc /= (np.sqrt(sq) + 1e-6)[..., None]
        acc -= (mean @ components).astype(np.float32)
        return acc

    def _load_or_fit_basis(self, volume: torch.Tensor, grid: list[np.ndarray], progress: bool) -> tuple[np.ndarray, np.ndarray]:
        if self._basis is None:
            basis_path = self.root / "basis.npz"
            basis_path.parent.mkdir(parents=True, exist_ok=True)
            with FileLock(str(basis_path) + ".lock"):
                if not basis_path.exists():
                    mean, components = self._fit_basis(volume, grid, progress)
                    remove_interrupted_writes(basis_path)
                    atomic_write(basis_path, lambda tmp: np.savez(tmp, mean=mean, components=components))
            z = load_arrays(basis_path)
            self._basis = (z["mean"].astype(np.float32), z["components"].astype(np.float32))
        return self._basis

    def _fit_basis(self, volume: torch.Tensor, grid: list[np.ndarray], progress: bool) -> tuple[np.ndarray, np.ndarray]:
        """PCA of the L2-normalised full feature vectors of a lattice of stored voxels."""
        enc = self.encoder
        step = max(1, math.ceil((np.prod([len(g) for g in grid]) / PCA_FIT_VOXELS) ** (1 / 3)))
        lattice = [g[::step] for g in grid]
        parts = []
        with tqdm(total=sum(len(lattice[a]) for a in enc.axes), desc="fit feature basis", unit="slice", disable=not progress, leave=False) as bar:
            for axis in enc.axes:
                rest = [g for i, g in enumerate(lattice) if i != axis]
                block = np.empty((len(lattice[axis]), enc.channels_per_axis, *[len(r) for r in rest]), np.float32)
                for start, feats in enc.slice_features(volume, axis, lattice[axis], *rest, bar=bar):
                    block[start : start + len(feats)] = feats.cpu().numpy()
                parts.append(np.moveaxis(np.moveaxis(block, 1, -1), 0, axis))  # (l0, l1, l2, 256)
        flat = np.concatenate(parts, -1).reshape(-1, enc.channels)
        flat = unit_rows(flat)  # cosine geometry before PCA
        mean = flat.mean(0)
        _, _, vt = np.linalg.svd(flat - mean, full_matrices=False)
        dims = min(self.dims, vt.shape[0])
        components = np.zeros((enc.channels, self.dims), np.float32)
        components[:, :dims] = vt[:dims].T
        return mean.astype(np.float32), components
