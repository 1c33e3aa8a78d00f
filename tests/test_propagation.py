"""Feature label fusion (:func:`semisam_o1.stage_one.propagation.propagate`) on MONAI's synthetic 3D test image."""

import numpy as np
import pytest
from monai.data import create_test_image_3d
from scipy import ndimage
from semisam_o1.evaluation import class_dice
from semisam_o1.stage_one.params import PropagationParams
from semisam_o1.stage_one.propagation import build_bank, propagate
from semisam_o1.stage_one.votes import volume_matched_argmax

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


@pytest.mark.parametrize("error,decision", [(0, "argmax"), (2, "argmax"), (2, "volume")])
def test_propagation_recovers_every_class_even_where_the_registration_is_off(case, error, decision):
    bank, label, target, truth, grid = case
    coords = grid - SHIFT + error  # the template voxel of every target voxel, off by `error` voxels per axis
    pred, confidence = propagate([bank], target, _features(target), [coords], PropagationParams(decision=decision))
    warped = ndimage.map_coordinates(label, np.moveaxis(coords, -1, 0), order=0)  # the registration alone
    dice, registration_only = class_dice(pred, truth, 4), class_dice(warped, truth, 4)
    assert pred.shape == truth.shape and pred.dtype == np.uint8
    assert confidence.shape == truth.shape and 0 <= confidence.min() and confidence.max() <= 1
    assert dice.min() > 0.88, dice
    if error:
        assert (dice - registration_only).min() > 0.2, (dice, registration_only)


def test_volume_decision_keeps_a_thin_class_that_five_jittered_votes_lose_under_argmax():
    # a 2-voxel slab (class 2) beside a 20-voxel one (class 1), voted by five templates off by -2..2 voxels
    truth = np.zeros((40, 8, 8), np.int64)
    truth[10:30], truth[30:32] = 1, 2
    shares = sum(np.stack([np.roll(truth, s, 0) == c for c in range(3)]).astype(np.float32) / 5 for s in range(-2, 3))
    shares = np.stack([ndimage.gaussian_filter(s, 1.0) for s in shares])
    argmax, (matched, _) = shares.argmax(0), volume_matched_argmax(shares)
    assert (argmax == 2).sum() == 0  # no voxel where the thin class holds the most votes
    assert matched.dtype == np.uint8
    np.testing.assert_allclose(np.bincount(matched.ravel(), minlength=3), shares.reshape(3, -1).sum(1), rtol=0.01)
    assert class_dice(matched, truth, 3).min() > 0.95
    # a bulky class the arg-max does not starve (it gains at a blurred border) is left exactly as the arg-max drew it
    slab = ndimage.gaussian_filter((truth == 1).astype(np.float32), 2.0)
    bulky = np.stack([1 - slab, slab])
    assert (bulky.argmax(0) == 1).sum() >= bulky[1].sum()
    np.testing.assert_array_equal(volume_matched_argmax(bulky)[0], bulky.argmax(0))


def test_an_unknown_fusion_decision_is_refused_naming_the_choices():
    with pytest.raises(ValueError, match="argmax"):
        PropagationParams(decision="majority")
