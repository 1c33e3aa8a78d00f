"""Round 0's border snapping (:func:`semisam_o1.stage_two.boundary.snap_to_edges`) on small synthetic volumes."""

import numpy as np
from scipy import ndimage as ndi
from semisam_o1.stage_two.boundary import snap_to_edges
from semisam_o1.stage_two.labels import soft_label


def two_part_object(seed: int = 0):
    """A bright object of two touching classes in noise, and a label drawn one voxel off its edges: too
    thin on one face of class 1, too thick on one face of class 2."""
    rng = np.random.default_rng(seed)
    truth = np.zeros((24, 28, 26), np.uint8)
    truth[6:18, 7:21, 5:13] = 1
    truth[6:18, 7:21, 13:20] = 2
    image = (rng.normal(0, 0.3, truth.shape) + (truth == 1) * 2.0 + (truth == 2) * 3.0).astype(np.float32)
    drawn = truth.copy()
    drawn[6, 7:21, 5:13] = 0  # class 1 one slice short
    drawn[18, 7:21, 13:20] = 2  # class 2 one slice too long
    return image, truth, drawn


def test_borders_drawn_a_voxel_off_move_onto_the_edges_and_deeper_voxels_never_change():
    image, truth, drawn = two_part_object()
    snapped = snap_to_edges(image, drawn)
    assert (drawn != truth).sum() == 210
    assert ((snapped > 0) != (truth > 0)).sum() <= 2  # the outline is the object's
    assert (snapped != truth).sum() <= 20  # (and the noisy 2-vs-3 interface within a voxel or so)
    fixed = ~ndi.binary_dilation(drawn > 0)
    for c in (1, 2):
        fixed |= ndi.binary_erosion(drawn == c)
    assert not (snapped != drawn)[fixed].any()


def test_soft_labels_follow_the_snapped_label_and_stay_distributions():
    image, _, drawn = two_part_object()
    probs = soft_label(drawn, np.full(drawn.shape, 0.9, np.float32), 3)
    before = probs.copy()
    snapped = snap_to_edges(image, drawn, probs=probs)
    np.testing.assert_allclose(probs.astype(np.float32).sum(0), 1.0, atol=2e-3)
    assert (probs.argmax(0) == snapped).all()
    band = ~(probs == before).all(0)
    fixed = ~ndi.binary_dilation(drawn > 0)
    for c in (1, 2):
        fixed |= ndi.binary_erosion(drawn == c)
    assert band.any() and not band[fixed].any()


def test_slabs_bound_the_solve_and_agree_with_the_whole_box():
    """Memory: a box solved a few planes at a time (``max_voxels``) gives the whole box's answer but for a
    few voxels where a walk would have left the slab; on anisotropic voxels only the spacing's ratios count."""
    image, truth, drawn = two_part_object(1)
    whole = snap_to_edges(image, drawn, spacing=(3.0, 1.0, 1.0))
    slabs = snap_to_edges(image, drawn, spacing=(3.0, 1.0, 1.0), max_voxels=6 * 32 * 30)
    assert (whole != slabs).mean() < 1e-3 and (slabs != truth).sum() <= 10
    np.testing.assert_array_equal(snap_to_edges(image, drawn, spacing=(6.0, 2.0, 2.0)), whole)


def test_a_class_thinner_than_the_band_keeps_its_voxels():
    image, _, drawn = two_part_object()
    drawn[20, 10:12, 10] = 3  # a two-voxel class: nothing is left of it after erosion
    snapped = snap_to_edges(image, drawn)
    assert (snapped[drawn == 3] == 3).all()
    empty = np.zeros_like(drawn)
    np.testing.assert_array_equal(snap_to_edges(image, empty), empty)
