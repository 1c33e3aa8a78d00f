"""Intensity normalisation per modality, to the [0, 1] range the encoders expect (MONAI transforms)."""

from __future__ import annotations

import numpy as np
from monai.transforms import ScaleIntensityRange, ScaleIntensityRangePercentiles, Transform

#: MRI: robust min/max from the 0.5th and 99.5th percentile of the volume.
MRI_PERCENTILES = (0.5, 99.5)
#: CT: soft-tissue window in Hounsfield units (the ``ct_window`` argument's default).
CT_WINDOW = (-160.0, 240.0)


def intensity_transform(modality: str = "mri", ct_window: tuple[float, float] = CT_WINDOW) -> Transform:
    """The MONAI transform mapping raw intensities to [0, 1] (clipped) for ``modality`` (``mri`` or ``ct``)."""
    if modality == "mri":
        lo, hi = MRI_PERCENTILES
        return ScaleIntensityRangePercentiles(lower=lo, upper=hi, b_min=0.0, b_max=1.0, clip=True)
    if modality == "ct":
        return ScaleIntensityRange(a_min=ct_window[0], a_max=ct_window[1], b_min=0.0, b_max=1.0, clip=True)
    raise ValueError(f"unknown modality '{modality}' (mri, ct)")


def normalization_id(modality: str = "mri", ct_window: tuple[float, float] = CT_WINDOW) -> str:
    """Short id of the normalisation, part of the feature cache key."""
    if modality == "mri":
        return "mri-p{}-{}".format(*MRI_PERCENTILES)
    return "ct-w{:g}-{:g}".format(*ct_window)


def normalize(array: np.ndarray, modality: str = "mri", ct_window: tuple[float, float] = CT_WINDOW) -> np.ndarray:
    """(D, H, W) raw intensities -> (D, H, W) float32 in [0, 1].

    MRI: the volume's 0.5th percentile maps to 0 and its 99.5th to 1; CT: ``ct_window`` (HU) maps to [0, 1];
    values outside are clipped.

    >>> normalize(np.array([[[-1000.0, 40.0, 1000.0]]]), "ct").tolist()
    [[[0.0, 0.5, 1.0]]]
    """
    out = intensity_transform(modality, ct_window)(array.astype(np.float32))
    return np.asarray(out, dtype=np.float32)
