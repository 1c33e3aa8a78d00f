"""Stage one on any label map: separate objects of different sizes on anisotropic grids, the per-class
connected-component rule, the registration safety floor, and bad templates / failed registrations."""

from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from semisam_o1.config import AppConfig
from semisam_o1.pool import build_stage_one, open_datastore
from semisam_o1.stage_one.params import FloorParams, PropagationParams
from semisam_o1.stage_one.plan import Plan
from semisam_o1.stage_one.predictor import Prediction, StageOne, registration_floor
from semisam_o1.stage_one.propagation import (build_bank, class_quota, consistent_mappings, keep_largest_per_class,
                                              mapping_consistency, propagate, window_radius)
from semisam_o1.stage_one.registration import RegistrationError
from semisam_o1.templates import Template, find_templates
from semisam_o1.volumes import InputError, load_image

SPACING = (1.5, 1.5, 6.0)  # thick slices along the last axis
SHAPE = (48, 44, 14)
#: class -> (centre, semi-axes in mm): a large organ, a medium and a small one (~20x apart in volume), all separate
OBJECTS = {1: ((22, 20, 7), (18, 15, 24)), 2: ((38, 10, 6), (6, 6, 12)), 3: ((8, 34, 8), (9, 8, 18))}


def phantom(shift=(0, 0, 0), scale=1.0, seed=0):
    """(image, label) of the three ellipsoids; ``shift`` in voxels, ``scale`` on the semi-axes."""
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in SHAPE], indexing="ij"), -1)
    label = np.zeros(SHAPE, np.uint8)
    for c, (centre, axes) in OBJECTS.items():
        d = ((grid - np.add(centre, shift)) * SPACING / (np.asarray(axes) * scale)) ** 2
        label[d.sum(-1) <= 1] = c
    rng = np.random.default_rng(seed)
    image = np.choose(label, [0.1, 0.8, 0.5, 0.3]) + rng.normal(0, 0.02, SHAPE)
    return image.astype(np.float32), label


def onehot_features(label, n=4, noise=0.05, seed=0):
    rng = np.random.default_rng(seed)
    return (np.eye(n, dtype=np.float32)[label].transpose(3, 0, 1, 2) + rng.normal(0, noise, (n, *label.shape))).astype(np.float32)


def shifted_coords(shift):
    """Target voxel -> template voxel for a target that is the template moved by ``shift`` voxels."""
    idx = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in SHAPE], indexing="ij"), -1)
    return idx - np.asarray(shift, np.float32)


def dice(a, b, c):
    x, y = a == c, b == c
    return 2 * (x & y).sum() / max(1, x.sum() + y.sum())


def test_every_separate_object_is_propagated_on_a_thick_slice_grid():
    image, label = phantom()
    target_image, target_label = phantom(shift=(2, -1, 1), seed=1)
    bank = build_bank(image, label, onehot_features(label), spacing=SPACING)
    assert bank.single_component == {1, 2, 3}
    # the registration is off by one voxel in-plane: features must pull every object back
    out, confidence = propagate([bank], target_image, onehot_features(target_label, seed=1), [shifted_coords((3, -1, 1))], spacing=SPACING)
    for c in OBJECTS:
        assert dice(out, target_label, c) > 0.85, (c, dice(out, target_label, c))
    assert 0 <= confidence.min() and confidence.max() <= 1


def test_window_and_margin_are_in_mm():
    r, step = window_radius(SPACING, 3.0)
    assert r.tolist() == [2, 2, 0] and step.tolist() == [1, 1, 1]  # 6 mm slices are not searched 3 slices deep
    _, label = phantom()
    bank = build_bank(None, label, onehot_features(label), spacing=SPACING, params=PropagationParams(margin_mm=5.0))
    dist_slices = np.abs(bank.coords[bank.core][:, 2][:, None] - np.argwhere(label > 0)[:, 2][None]).min(1)
    assert dist_slices.max() <= 1  # 5 mm margin on 6 mm slices: no more than the neighbouring slice


def test_bank_sampling_keeps_every_class_of_organs_10x_apart():
    _, label = phantom()
    counts = {c: int((label == c).sum()) for c in range(4)}
    assert counts[1] > 8 * counts[2]
    budget = counts[2] + counts[3] + 2000
    bank = build_bank(None, label, onehot_features(label), spacing=SPACING, max_voxels=budget)
    kept = {c: int((bank.labels == c).sum()) for c in range(4)}
    assert kept[2] == counts[2] and kept[3] == counts[3]  # small organs entirely
    assert kept[1] >= 500 and len(bank.labels) <= budget and len(bank.labels) >= budget - 4
    assert class_quota({0: 500, 1: 100, 2: 10}, 300) == {0: 190, 1: 100, 2: 10}


def test_largest_component_is_kept_per_class_only_where_the_template_class_is_one_object():
    _, label = phantom()
    two = label.copy()
    two[two == 3] = 2  # class 2 = two separate objects in this template
    image = np.zeros(SHAPE, np.float32)
    bank = build_bank(image, two, onehot_features(two), spacing=SPACING)
    assert bank.single_component == {1}
    noisy = two.copy()
    noisy[0:2, 40:44, 0:2] = 1  # a stray island of class 1 far from the organ
    out = keep_largest_per_class(noisy, bank.single_component)
    assert (out[0:2, 40:44, 0:2] == 0).all() and (out == 1).sum() == (two == 1).sum()
    assert (out == 2).sum() == (two == 2).sum()  # both objects of the multi-object class survive
    # end to end: both objects of class 2 are propagated
    pred, _ = propagate([bank], image, onehot_features(two, seed=2), [shifted_coords((0, 0, 0))], spacing=SPACING)
    assert dice(pred, two, 2) > 0.9 and dice(pred, two, 1) > 0.9


def test_safety_floor_falls_back_to_the_warp_where_features_are_useless():
    image, label = phantom()
    target_image, target_label = phantom(shift=(1, 1, 0), seed=3)
    bank = build_bank(image, label, onehot_features(label), spacing=SPACING)
    # misleading target features: the small organ looks like background, the rest is right
    feats = onehot_features(np.where(target_label == 2, 0, target_label), seed=3)
    voted, _ = propagate([bank], target_image, feats, [shifted_coords((1, 1, 0))], spacing=SPACING)
    assert dice(voted, target_label, 2) < 0.5
    warped = phantom(shift=(1, 1, 0))[1]  # what a registration-only warp gives here
    out, stats = registration_floor(voted, warped, [1, 2, 3])
    assert stats[2]["fallback"] and not stats[1]["fallback"] and not stats[3]["fallback"]
    assert dice(out, target_label, 2) > 0.9 and dice(out, target_label, 1) >= dice(voted, target_label, 1)
    off, _ = registration_floor(voted, warped, [1, 2, 3], FloorParams(enabled=False))
    np.testing.assert_array_equal(off, voted)
    volume = SimpleNamespace(spacing=SPACING)
    summary = Prediction(image=volume, label=out, confidence=np.ones(SHAPE, np.float32), floor=stats).summary({"liver": 1, "kidney": 2, "spleen": 3})
    assert summary["registration_fallback"] == ["kidney"]
    assert summary["classes"]["kidney"]["source"] == "registration" and summary["classes"]["liver"]["source"] == "features"


def test_safety_floor_with_two_registrations_keeps_a_vote_either_warp_confirms():
    """``--set stage_one.registration=demons+syn``: a class's vote stands if it passes against any of the warps;
    one that fails against all falls back to the warp that agrees with it best."""
    _, truth = phantom(shift=(1, 1, 0))
    wrong = phantom(shift=(4, 4, 0))[1]  # one registration far off, the other right
    voted = truth.copy()
    voted[(truth == 2) & (np.arange(SHAPE[0])[:, None, None] >= 39)] = 0  # the vote lost half of class 2: no warp confirms it
    out, stats = registration_floor(voted, {"demons": wrong, "syn": truth}, [1, 2, 3])
    assert not stats[3]["fallback"] and stats[3]["registration"] == "syn"
    assert stats[2]["fallback"] and dice(out, truth, 2) == 1.0  # fell back to the warp it agrees with best
    np.testing.assert_array_equal(out[truth != 2], voted[truth != 2])  # kept votes are untouched
    alone, alone_stats = registration_floor(truth, wrong, [1, 2, 3])  # against the wrong warp alone it would fall back
    assert alone_stats[3]["fallback"]


def test_a_failed_registration_is_left_out_by_feature_consistency():
    """Two mappings of one template: the right one and one 8 voxels off (a failed registration). The
    features score the wrong one clearly lower, it is left out, and the vote equals the right mapping's."""
    image, label = phantom()
    bank = build_bank(image, label, onehot_features(label), spacing=SPACING)
    target_image, target_label = phantom(shift=(1, 1, 0), seed=3)
    feats = onehot_features(target_label, seed=3)
    right, wrong = shifted_coords((1, 1, 0)), shifted_coords((9, 9, 0))
    scores = [mapping_consistency(bank, feats, c, SHAPE) for c in (right, wrong)]
    assert scores[0] > scores[1] + 0.05
    assert consistent_mappings(scores, PropagationParams().mapping_tolerance) == [True, False]
    assert consistent_mappings([scores[0], scores[0] - 0.01], 0.05) == [True, True]  # two working registrations both vote
    alone, _ = propagate([bank], target_image, feats, [right], spacing=SPACING)
    assert all(dice(alone, target_label, c) > 0.9 for c in (1, 2, 3))


def write_phantom(root, name, image, label=None):
    affine = np.diag([*SPACING, 1.0])
    nib.save(nib.Nifti1Image(image, affine), str(root / f"{name}.nii.gz"))
    if label is not None:
        (root / "labels" / "final").mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(label, affine), str(root / "labels" / "final" / f"{name}.nii.gz"))


FAST = {"labels": "a=1,b=2,c=3", "stage_one.encoder_image_size": "32", "stage_one.encoder_axes": "2", "stage_one.feature_dims": "8", "stage_one.registration": "demons"}


def test_stage_one_end_to_end_finds_every_object_of_a_multi_object_template(tmp_path):
    studies = tmp_path / "studies"
    studies.mkdir()
    image, label = phantom()
    write_phantom(studies, "template", image, label)
    target_image, target_label = phantom(shift=(2, -2, 0), scale=1.05, seed=5)
    write_phantom(studies, "target", target_image)
    stage_one = build_stage_one(studies, AppConfig.from_conf(FAST))
    prediction = stage_one.predict(studies / "target.nii.gz", find_templates(open_datastore(studies)))
    for c in OBJECTS:
        assert dice(prediction.label, target_label, c) > 0.6, (c, dice(prediction.label, target_label, c), prediction.floor)
    assert set(prediction.summary({"a": 1, "b": 2, "c": 3})["classes"]) == {"a", "b", "c"}
    assert any("affine-demons" in p.name for p in (studies / ".semisam" / "registration").iterdir())


def test_template_missing_a_declared_class_is_refused_naming_it(tmp_path):
    studies = tmp_path / "studies"
    studies.mkdir()
    image, label = phantom()
    label[label == 2] = 0
    write_phantom(studies, "template", image, label)
    stage_one = StageOne(studies, SimpleNamespace(), label_names={"liver": 1, "right_kidney": 2, "spleen": 3})
    template = Template("template", studies / "template.nii.gz", studies / "labels" / "final" / "template.nii.gz")
    with pytest.raises(InputError, match=r"no voxels of class 'right_kidney' \(value 2\)"):
        stage_one.bank(template)
    label[label == 3] = 7  # a value beyond the label map
    write_phantom(studies, "template", image, label)
    with pytest.raises(InputError, match=r"\[7\]"):
        StageOne(studies, SimpleNamespace(), label_names={"liver": 1, "right_kidney": 2, "spleen": 3}).bank(template)


def test_failed_registration_is_a_clear_per_image_error(tmp_path):
    studies = tmp_path / "studies"
    studies.mkdir()
    image, label = phantom()
    write_phantom(studies, "template", image, label)
    write_phantom(studies, "blank", np.zeros(SHAPE, np.float32))  # nothing to register to
    stage_one = StageOne(studies, SimpleNamespace(plan=Plan()))
    with pytest.raises(RegistrationError, match=r"blank.nii.gz: registration \(demons\) to template template.nii.gz failed"):
        stage_one.transform(studies / "blank.nii.gz", studies / "template.nii.gz")


def test_a_failed_registration_skips_that_image_only_and_is_reported(tmp_path, monkeypatch):
    import semisam_o1.stage_one.registration as so
    from semisam_o1.pipeline import run_stage_one

    real = so.demons_register

    def failing(fixed, moving, initial):  # ITK's own message for volumes that do not overlap
        if sitk.GetArrayViewFromImage(fixed).mean() < 0.01:  # the blank image only
            raise RuntimeError("Exception thrown in SimpleITK Execute:\nAll samples map outside moving image buffer")
        return real(fixed, moving, initial)

    monkeypatch.setattr(so, "demons_register", failing)

    studies = tmp_path / "studies"
    studies.mkdir()
    image, label = phantom()
    write_phantom(studies, "template", image, label)
    write_phantom(studies, "target", phantom(shift=(1, 1, 0), seed=7)[0])
    blank = np.zeros(SHAPE, np.float32)
    blank[0, 0, 0] = 1.0  # not constant (a valid image), but nothing for registration to align
    write_phantom(studies, "zblank", blank)
    report = run_stage_one(studies, AppConfig.from_conf(FAST), progress=False)
    assert list(report["cases"]) == ["target"]
    assert "registration (demons) to template template.nii.gz failed" in report["errors"]["zblank"]
