"""The paper's stage one (an ablation here, ``propagation prototype``): one mean feature vector per class of each
template, every target voxel labelled by its nearest prototype (cosine). No registration is used and no safety
floor applies; :meth:`~semisam_o1.stage_one.predictor.StageOne.predict` calls :func:`predict_prototypes` and
returns its label and confidence as they are.
"""

from __future__ import annotations

import numpy as np

from semisam_o1.stage_one.feature_cache import FeatureCache, as_grid, unit_rows
from semisam_o1.stage_one.propagation import SLAB_VOXELS
from semisam_o1.templates import Template
from semisam_o1.volumes import Volume, load_image, load_label


def predict_prototypes(cache: FeatureCache, image: Volume, templates: list[Template], allowed: set[int] | None = None,
                       progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The paper's stage one on ``image``: the class prototypes of every template (:func:`class_prototypes`, classes
    ``0..`` the largest value of any template label), then the nearest prototype per voxel (:func:`propagate_prototypes`).
    Features come from ``cache`` (encoded on a miss); template labels are checked against ``allowed`` label values.

    Returns ``label (D, H, W) uint8`` and ``confidence (D, H, W) float32``.
    """
    labels = [load_label(t.label_path, load_image(t.image_path), allowed=allowed) for t in templates]
    n_classes = 1 + max(int(lab.max()) for lab in labels)
    protos = [class_prototypes(cache.get_or_compute(load_image(t.image_path), progress=progress), lab, n_classes)
              for t, lab in zip(templates, labels)]
    return propagate_prototypes(protos, cache.get_or_compute(image, progress=progress), image.array.shape)


def class_prototypes(features, label: np.ndarray, n_classes: int) -> np.ndarray:
    """The paper's stage one, step 1: one prototype per class (background included), the mean of the
    template's L2-normalised features over the class's voxels, L2-normalised: ``(n_classes, C)``.

    Args:
        features: the template's :class:`FeatureGrid` (or dense ``(C, D, H, W)``).
        label: ``(D, H, W)`` int class map of the template.
        n_classes: classes ``0..n_classes-1``; a class with no voxel gets a zero prototype.
    """
    grid = as_grid(features)
    label = np.asarray(label).reshape(-1)
    sums = np.zeros((n_classes, grid.channels), np.float64)
    for start in range(0, len(label), SLAB_VOXELS):
        idx = np.arange(start, min(len(label), start + SLAB_VOXELS))
        np.add.at(sums, label[idx], unit_rows(grid.at_flat(idx)))
    return unit_rows(sums.astype(np.float32))


def propagate_prototypes(prototypes: list[np.ndarray], features, shape: tuple[int, ...], h: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """The paper's stage one, step 2 (ablation of :func:`propagate`): every target voxel takes the class
    of its most cosine-similar prototype (over all templates' prototypes of that class, the best one).

    Returns ``labels (D, H, W) uint8`` and ``confidence (D, H, W) float32``: the winning class's
    softmax share of the similarities at temperature ``h``. No registration, no clean-up.
    """
    protos = np.stack(prototypes)  # (T, K, C)
    grid = as_grid(features)
    n = int(np.prod(shape))
    label = np.empty(n, np.uint8)
    confidence = np.empty(n, np.float32)
    for start in range(0, n, SLAB_VOXELS):
        idx = np.arange(start, min(n, start + SLAB_VOXELS))
        sims = np.einsum("nc,tkc->tnk", unit_rows(grid.at_flat(idx)), protos).max(0)  # (N, K): best template per class
        label[idx] = sims.argmax(1)
        w = np.exp((sims - sims.max(1, keepdims=True)) / h)
        confidence[idx] = (w.max(1) / w.sum(1)).astype(np.float32)
    return label.reshape(shape), confidence.reshape(shape)
