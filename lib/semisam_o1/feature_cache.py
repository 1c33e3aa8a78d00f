"""Foundation features computed once per image and kept on disk inside the datastore.

Layout (one folder per setting, so changing the encoder or its settings never mixes features)::

    <studies>/.semisam/features/<settings id>/
        basis.npz            PCA basis (mean (C,), components (C, dims)) of L2-normalised encoder
                             features, fitted on the first image encoded
        <image sha256[:20]>.npy   float16 (dims, D, H, W)

The settings id joins the encoder id (architecture, weights hash, input size, axes), the intensity
normalisation and the stored dimension, so any change invalidates the cache; the file name is the
image's content hash, so an image replaced under the same name is encoded again. Files are written
atomically. The PCA basis is fitted on the first image encoded with a setting and kept for all later
images, so features of every image live in one space.
"""

from __future__ import annotations

import logging
from pathlib import Path
import numpy as np

from semisam_o1.encoders import Encoder, EncoderSpec
from semisam_o1.normalize import normalization_id, normalize
from semisam_o1.sample_data import sha256
from semisam_o1.volumes import Volume, atomic_write

logger = logging.getLogger(__name__)

CACHE_DIR = Path(".semisam") / "features"
#: Voxels sampled from the first image to fit the PCA basis.
PCA_FIT_VOXELS = 20000


class FeatureCache:
    """Encoded, PCA-compressed features of images, keyed by content hash and settings.

    Args:
        studies: the datastore folder; the cache lives under ``studies/.semisam/features``.
        encoder: which encoder; it is built (weights loaded) only on the first cache miss.
        dims: stored feature dimension after PCA (32 -> 64 bytes per voxel in float16).
        modality: intensity normalisation (``mri``/``ct``).
    """

    def __init__(self, studies: Path, encoder: EncoderSpec = EncoderSpec(), dims: int = 32, modality: str = "mri"):
        self.dims = dims
        self.modality = modality
        self.settings_id = f"{encoder.id}-{normalization_id(modality)}-l2pca{dims}"
        self.root = Path(studies) / CACHE_DIR / self.settings_id
        self.spec = encoder
        self._encoder: Encoder | None = None
        self._basis: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def encoder(self) -> Encoder:
        if self._encoder is None:
            self._encoder = self.spec.build()
        return self._encoder

    def path(self, image_path: Path) -> Path:
        return self.root / f"{sha256(image_path)[:20]}.npy"

    def get(self, image: Volume) -> np.ndarray | None:
        """Cached features (dims, D, H, W) float16 of ``image``, or ``None`` on a miss."""
        path = self.path(image.path)
        if not path.exists():
            return None
        feats = np.load(path, mmap_mode="r")
        if feats.shape[1:] != image.array.shape:
            logger.warning(f"{path}: cached shape {feats.shape} does not fit {image.path}; encoding again")
            return None
        return feats

    def get_or_compute(self, image: Volume, progress: bool = False) -> np.ndarray:
        """Features (dims, D, H, W) float16 of ``image``: from disk, or encoded, compressed and stored."""
        cached = self.get(image)
        if cached is not None:
            return cached
        raw = self.encoder.encode(normalize(image.array, self.modality), progress=progress)  # (C, D, H, W)
        feats = self._project(raw).astype(np.float16)
        atomic_write(self.path(image.path), lambda tmp: np.save(tmp, feats))
        return feats

    def _project(self, raw: np.ndarray) -> np.ndarray:
        """(C, D, H, W) -> (dims, D, H, W) with the setting's PCA basis (fitted here on first use)."""
        c = raw.shape[0]
        flat = raw.reshape(c, -1).T  # (N, C)
        flat = flat / (np.linalg.norm(flat, axis=1, keepdims=True) + 1e-6)  # cosine geometry before PCA
        mean, components = self._load_or_fit_basis(flat)
        return ((flat - mean) @ components).T.reshape(self.dims, *raw.shape[1:])

    def _load_or_fit_basis(self, flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self._basis is None:
            basis_path = self.root / "basis.npz"
            if not basis_path.exists():
                rng = np.random.default_rng(0)
                sample = flat[rng.choice(len(flat), min(len(flat), PCA_FIT_VOXELS), replace=False)]
                mean = sample.mean(0)
                _, _, vt = np.linalg.svd(sample - mean, full_matrices=False)
                atomic_write(basis_path, lambda tmp: np.savez(tmp, mean=mean, components=vt[: self.dims].T))
            with np.load(basis_path) as z:
                self._basis = (z["mean"], z["components"])
        return self._basis
