"""Feature label fusion (:func:`semisam_o1.propagation.propagate`) on MONAI's synthetic 3D test image."""

import numpy as np
import pytest
from monai.data import create_test_image_3d
from scipy import ndimage

from semisam_o1.evaluation import class_dice
from semisam_o1.propagation import build_bank, propagate

SHIFT = np.array([3, 2, -2])


def _features(image: np.ndarray) -> np.ndarray:
    """(4, D, H, W): the image at four Gaussian scales, centred (a stand-in for an encoder's features)."""
    return np.stack([ndimage.gaussian_filter(image, s) for s in (0.5, 1, 2, 4)]).astype(np.float32) - 0.3


@pytest.fixture(scope="module")
def case():
    image, label = create_test_image_3d(48, 48, 48, num_objs=5, rad_max=9, rad_min=5, noise_max=0.2, num_seg_classes=3,
                                        random_state=np.random.RandomState(3))
    label = label.astype(np.int64)
    target, truth = ndimage.shift(image, SHIFT, order=1), ndimage.shift(label, SHIFT, order=0)
    grid = np.stack(np.meshgrid(*[np.arange(48)] * 3, indexing="ij"), -1).astype(np.float32)
    return build_bank(None, label, _features(image)), label, target, truth, grid


@pytest.mark.parametrize("error", [0, 2])
def test_propagation_recovers_every_class_even_where_the_registration_is_off(case, error):
    bank, label, target, truth, grid = case
    coords = grid - SHIFT + error  # the template voxel of every target voxel, off by `error` voxels per axis
    pred, confidence = propagate([bank], target, _features(target), [coords])
    warped = ndimage.map_coordinates(label, np.moveaxis(coords, -1, 0), order=0)  # the registration alone
    dice, registration_only = class_dice(pred, truth, 4), class_dice(warped, truth, 4)
    assert pred.shape == truth.shape and pred.dtype == np.uint8
    assert confidence.shape == truth.shape and 0 <= confidence.min() and confidence.max() <= 1
    assert dice.min() > 0.88, dice
    if error:
        assert (dice - registration_only).min() > 0.2, (dice, registration_only)
