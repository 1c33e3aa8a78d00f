"""Feature-space refinement on constructed cases: exactly the uncertain voxels change, to the right class."""

import dataclasses

import numpy as np
from semisam_o1.stage_two.params import RefineParams
from semisam_o1.stage_two.refinement import RefineCase, refine_volumes, refine_voxels


def constructed_case(rng, shape=(6, 7, 8)):
    """Truth: a block of class 1 and one of class 2; features = class one-hot + small noise."""
    truth = np.zeros(shape, np.int64)
    truth[1:3, 1:5, 1:6] = 1
    truth[4:6, 2:6, 2:7] = 2
    feats = np.eye(3, dtype=np.float32)[truth].transpose(3, 0, 1, 2) + 0.05 * rng.standard_normal((3, *shape)).astype(np.float32)
    return truth, feats


def test_uncertain_voxels_take_the_label_of_their_confident_neighbours():
    rng = np.random.default_rng(0)
    truth_t, feats_t = constructed_case(rng)
    truth, feats = constructed_case(rng)
    predicted = truth.copy()
    wrong_uncertain = [(1, 1, 1), (4, 3, 3), (0, 0, 0)]
    wrong_confident = (2, 4, 5)
    for idx, value in zip(wrong_uncertain, [2, 0, 1]):
        predicted[idx] = value
    predicted[wrong_confident] = 0
    entropy = np.zeros(truth.shape, np.float32)
    for idx in wrong_uncertain:
        entropy[idx] = 1.0
    entropy[3, 3, 3] = 1.0  # uncertain but already right: stays right

    cases = [RefineCase(feats_t, truth_t, np.zeros_like(entropy), is_template=True), RefineCase(feats, predicted, entropy)]
    result = refine_voxels(cases, RefineParams(uncertain_quantile=0.9, k=5))

    refined = result.labels[1]
    assert result.uncertain_voxels == 4
    for idx in wrong_uncertain:
        assert refined[idx] == truth[idx]
    assert refined[wrong_confident] == 0  # confident voxels are never touched, even when wrong
    changed = refined != predicted
    assert changed.sum() == 3 and all(changed[idx] for idx in wrong_uncertain)
    assert result.changed_per_class == {0: 1, 1: 1, 2: 1}
    np.testing.assert_array_equal(result.labels[0], truth_t)  # template unchanged


def test_volume_level_ablation_replaces_whole_label_maps():
    rng = np.random.default_rng(1)
    cases = []
    for n in range(10):
        truth, feats = constructed_case(rng)
        entropy = np.full(truth.shape, 0.9 if n == 3 else 0.1, np.float32)
        cases.append(RefineCase(feats, (truth if n != 3 else np.zeros_like(truth)), entropy, is_template=n == 0))
    result = refine_volumes(cases, fraction=0.1)
    assert result.labels[3].sum() > 0  # the most uncertain volume got a donor's map
    for n in range(10):
        if n != 3:
            np.testing.assert_array_equal(result.labels[n], cases[n].label)


def test_bank_sampling_does_not_tilt_votes_to_the_rare_class():
    """10 confident foreground voxels and ~100 background ones around them, a bank of 10: an uncertain
    voxel only slightly closer to foreground features follows what the confident voxels say as a whole
    (a class-balanced bank of 5 + 5 voted it foreground)."""
    shape = (10, 10, 11)
    label = np.zeros(shape, np.int64)
    label.reshape(-1)[:10] = 1
    feats = np.zeros((2, *shape), np.float32)
    feats[0][label == 0], feats[1][label == 1] = 1.0, 1.0
    entropy = np.zeros(shape, np.float32)
    border = (9, 9, 10)
    feats[:, 9, 9, 10] = [0.9, 1.0]
    entropy[border] = 1.0
    result = refine_voxels([RefineCase(feats, label, entropy)], RefineParams(uncertain_quantile=0.999, k=10, bank_size=10))
    assert result.uncertain_voxels == 1
    assert result.labels[0][border] == 0


def test_position_in_the_common_frame_separates_look_alike_structures():
    """Two structures with near-identical features (like the two hippocampus parts): an uncertain voxel
    of the first, whose features are a little closer to the second's, gets the first's class only
    when its position counts."""
    shape = (4, 12, 4)
    label = np.zeros(shape, np.int64)
    label[:, 1:5] = 1
    label[:, 7:11] = 2
    feats = np.zeros((3, *shape), np.float32)
    feats[0][label == 0] = 1.0
    feats[1][label > 0] = 1.0
    feats[2][label == 2] = 0.1
    entropy = np.zeros(shape, np.float32)
    voxel = (2, 3, 2)
    feats[:, 2, 3, 2] = [0.0, 1.0, 0.09]
    entropy[voxel] = 1.0
    position = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij"), -1)
    case = RefineCase(feats, label, entropy, position=position)
    params = RefineParams(uncertain_quantile=0.99, k=5)
    assert refine_voxels([case], params).labels[0][voxel] == 1
    assert refine_voxels([case], dataclasses.replace(params, position_weight=0.0)).labels[0][voxel] == 2
