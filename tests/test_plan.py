"""The working plan (written once, read back, overridden by explicit options), the device option, and
labels that come back on the image's own grid whatever the feature stride and registration grid."""

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from semisam_o1.config import AppConfig
from semisam_o1.parsers import ConfError
from semisam_o1.pool import build_stage_one, open_datastore
from semisam_o1.stage_one.plan import PLAN_FILE, Plan, make_plan, resolve_device, shrink_factors
from semisam_o1.templates import find_templates
from semisam_o1.volumes import load_label, save_label

FAST = {"labels": "anterior=1,posterior=2", "stage_one.encoder_image_size": "32", "stage_one.encoder_axes": "0,2", "stage_one.feature_dims": "8", "stage_one.registration": "demons"}


def dice(a, b, value):
    x, y = a == value, b == value
    return 2 * (x & y).sum() / (x.sum() + y.sum())


def test_plan_is_written_once_and_read_back(tiny_studies):
    build_stage_one(tiny_studies, AppConfig.from_conf(FAST))
    written = json.loads((tiny_studies / PLAN_FILE).read_text())
    assert written["feature_stride"] == 1 and written["planned_from"]["images"] == 3  # crops: a feature per voxel
    assert written["planned_from"]["median_shape"] == [35, 51, 35]
    assert written["modality"] == "mri"  # detected: float MRI crops
    assert Plan.load(tiny_studies) == Plan(**{k: written[k] for k in ("encoder_image_size", "feature_stride", "registration_voxels", "modality")})
    # an explicit option overrides the plan, rewrites it, and changes the cache folder (settings id)
    other = build_stage_one(tiny_studies, AppConfig.from_conf({**FAST, "stage_one.feature_stride": "2"}))
    assert json.loads((tiny_studies / PLAN_FILE).read_text())["feature_stride"] == 2
    assert other.cache.settings_id.endswith("-g2")


def test_planned_slice_size_fits_the_slices_on_gpu_and_stays_small_on_cpu():
    la = [((183, 140, 88), (0.625,) * 3)] * 3
    assert make_plan(la, "cpu").encoder_image_size == 64
    assert make_plan(la, "cpu").feature_stride == 2 and make_plan([((35, 50, 35), (1.0,) * 3)], "cpu").feature_stride == 1
    assert make_plan(la, "cuda").encoder_image_size == 192
    assert make_plan([((512, 512, 300), (0.7, 0.7, 1.0))], "cuda").encoder_image_size == 256
    assert make_plan([((35, 50, 35), (1.0,) * 3)], "cuda").encoder_image_size == 64


def test_thick_slice_axes_keep_every_slice():
    assert Plan(feature_stride=2).stride((1.0, 1.0, 1.0)) == (2, 2, 2)
    assert Plan(feature_stride=2).stride((1.25, 1.25, 7.7)) == (2, 2, 1)
    assert Plan(feature_stride=2).stride((0.7, 0.7, 2.5)) == (2, 2, 1)
    # a thin-slice scan is not "thick" in-plane because its slices are thinner still (512 x 512 x 600 LA: 16 -> 8 B/voxel)
    assert Plan(feature_stride=2).stride((0.243, 0.175, 0.092)) == (2, 2, 2)
    assert Plan(registration_voxels=1000).registration_shrink((50, 40, 30), (1, 1, 1)) == (5, 5, 5)  # 60 k -> 10 x 8 x 6
    assert Plan(registration_voxels=10_000).registration_shrink((34, 52, 11), (1, 1, 3)) == (2, 2, 1)  # thick axis kept
    assert Plan().registration_shrink((35, 51, 35), (1, 1, 1)) == (1, 1, 1)


def test_a_coarsest_grid_keeps_small_organs_two_grid_points_across(tmp_path):
    """``--set stage_one.coarsest_grid_mm=5`` on head-and-neck CT (4 x 4 x 2.5 mm, 2.1 M voxels): the 1 M voxel
    registration limit gives way rather than register on a 7.8 x 7.8 x 7.5 mm grid, and features are stored per
    voxel in-plane. Scans whose grids are within 5 mm keep their plans; without it (the default) nothing changes."""
    ct = ((128, 128, 128), (3.906, 3.906, 2.5))
    floor = Plan(coarsest_grid_mm=5.0)
    assert Plan().registration_shrink(*ct) == shrink_factors(*ct, 1_000_000) == (2, 2, 3) and Plan().stride(ct[1]) == (2, 2, 2)
    assert floor.registration_shrink(*ct) == (1, 1, 2) and floor.stride(ct[1]) == (1, 1, 2)
    assert floor.registration_shrink((128, 128, 128), (5.078, 5.078, 2.5)) == (1, 1, 2)  # an axis coarser already stays whole
    unchanged = [((183, 140, 88), (0.625,) * 3), ((256, 256, 36), (1.25, 1.25, 7.7)), ((35, 51, 35), (1.0,) * 3),
                 ((512, 512, 300), (0.8, 0.8, 1.0))]  # LA, CHAOS T2, a hippocampus crop, a thin-slice CT
    for shape, spacing in unchanged:
        assert floor.registration_shrink(shape, spacing) == Plan().registration_shrink(shape, spacing)
        assert floor.stride(spacing) == Plan().stride(spacing)
    # the option is written to the plan and read back; a plan written before the field existed has no floor
    (tmp_path / PLAN_FILE).parent.mkdir(parents=True)
    floor.save(tmp_path)
    assert Plan.load(tmp_path).stride(ct[1]) == (1, 1, 2)
    (tmp_path / PLAN_FILE).write_text(json.dumps({"encoder_image_size": 64, "feature_stride": 2, "registration_voxels": 1_000_000}))
    assert Plan.load(tmp_path).coarsest_grid_mm == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_a_gpu_is_a_start_up_error_naming_the_option():
    with pytest.raises(ConfError, match="--conf device: .*CUDA is not available"):
        AppConfig.from_conf({"device": "cuda"})
    with pytest.raises(ConfError, match="--conf device"):
        AppConfig.from_conf({"device": "tpu"})


def test_device_cpu_and_auto_run_the_same_job(tiny_studies):
    """``device auto`` is CUDA where there is one, else the CPU: the same stage-one job works with both."""
    templates = find_templates(open_datastore(tiny_studies))
    labels = {}
    for device in ("cpu", "auto"):
        stage_one = build_stage_one(tiny_studies, AppConfig.from_conf({**FAST, "device": device}))
        assert stage_one.cache.device == resolve_device(device)
        shutil.rmtree(stage_one.cache.root, ignore_errors=True)  # encode again on this device
        labels[device] = stage_one.predict(tiny_studies / "hippocampus_003.nii.gz", templates).label
    agree = (labels["cpu"] == labels["auto"]).mean()
    assert agree == 1.0 if resolve_device("auto") == "cpu" else agree > 0.99


def test_label_comes_back_on_the_images_own_grid(tmp_path, sample_source):
    """An anisotropic, offset image (thick third axis: stride (2, 2, 1)), registered on a shrunk
    grid: the label has the image's shape, spacing, origin and direction, and still finds the structure."""
    studies = tmp_path / "studies"
    (studies / "labels" / "final").mkdir(parents=True)
    shutil.copy(sample_source.images / "hippocampus_001.nii.gz", studies)
    shutil.copy(sample_source.labels / "hippocampus_001.nii.gz", studies / "labels" / "final")
    source = sitk.ReadImage(str(sample_source.images / "hippocampus_003.nii.gz"), sitk.sitkFloat32)
    truth_src = sitk.ReadImage(str(sample_source.labels / "hippocampus_003.nii.gz"))
    size = [source.GetSize()[0], source.GetSize()[1], source.GetSize()[2] // 3]
    spacing = [1.0, 1.0, 3.0]
    direction = source.GetDirection()
    origin = tuple(o + 0.5 for o in source.GetOrigin())
    thick = sitk.Resample(source, size, sitk.Transform(), sitk.sitkLinear, origin, spacing, direction, 0.0, sitk.sitkFloat32)
    truth = sitk.Resample(truth_src, size, sitk.Transform(), sitk.sitkNearestNeighbor, origin, spacing, direction, 0, sitk.sitkUInt8)
    sitk.WriteImage(thick, str(studies / "thick.nii.gz"))
    sitk.WriteImage(truth, str(tmp_path / "thick_truth.nii.gz"))

    stage_one = build_stage_one(studies, AppConfig.from_conf(FAST))
    stage_one.cache.plan = Plan(feature_stride=2, registration_voxels=10_000)  # force the shrunk registration grid
    image_path = studies / "thick.nii.gz"
    assert stage_one.cache.plan.registration_shrink(thick.GetSize(), thick.GetSpacing()) == (2, 2, 1)
    assert "-shrink" in stage_one.registration_path(image_path, studies / "hippocampus_001.nii.gz").name
    prediction = stage_one.predict(image_path, find_templates(open_datastore(studies)))
    assert stage_one.cache.get(prediction.image).stride == (2, 2, 1)
    out = save_label(prediction.label, prediction.image, tmp_path / "out.nii.gz")
    got, ref = nib.load(str(out)), nib.load(str(image_path))
    assert got.shape == ref.shape and np.allclose(got.affine, ref.affine)
    got_itk = sitk.ReadImage(str(out))
    assert got_itk.GetSpacing() == thick.GetSpacing() and got_itk.GetOrigin() == thick.GetOrigin()
    assert got_itk.GetDirection() == thick.GetDirection()
    reference = load_label(tmp_path / "thick_truth.nii.gz", prediction.image)
    assert np.mean([dice(prediction.label, reference, v) for v in (1, 2)]) > 0.4


def test_gpu_out_of_memory_falls_back_to_the_cpu_with_a_warning(caplog):
    from semisam_o1.stage_one.plan import with_cpu_fallback

    def run(device):
        if device != "cpu":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return device

    assert with_cpu_fallback(run, "cuda", "encoding case.nii.gz") == "cpu"
    assert "encoding case.nii.gz: out of GPU memory on cuda" in caplog.text
    with pytest.raises(torch.cuda.OutOfMemoryError):
        with_cpu_fallback(lambda device: run("cuda"), "cpu", "x")


def test_a_scan_too_large_for_memory_is_refused_naming_it():
    from semisam_o1.volumes import InputError, check_memory

    with pytest.raises(InputError, match=r"big\.nii\.gz: encoding: 4096x4096x4096 voxels .* GiB available"):
        check_memory("big.nii.gz: encoding", (4096, 4096, 4096), 8)
    check_memory("small.nii.gz: encoding", (35, 51, 35), 8)


def test_a_network_prediction_too_large_for_memory_is_refused_naming_the_image(tiny_studies, monkeypatch):
    """The served ``semisam_o1`` infer (stage two's predict) checks its memory like encoding and stage one:
    with less memory free than the image needs, an ``InputError`` (HTTP 422) naming it, before any work."""
    import psutil
    from semisam_o1.stage_two.network import build_network
    from semisam_o1.stage_two.params import TrainParams
    from semisam_o1.stage_two.rounds import StageTwo
    from semisam_o1.volumes import InputError, load_image

    stage_one = build_stage_one(tiny_studies, AppConfig.from_conf(FAST))
    two = StageTwo(tiny_studies, stage_one)
    net = build_network(3, TrainParams(channels=(4, 8)))
    image = load_image(tiny_studies / "hippocampus_003.nii.gz")
    label, _ = two.predict(net, image)  # fits: a label on the image's grid
    assert label.shape == image.array.shape
    need = image.array.size * (4 * 3 + 8 * 3 + 8)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: type("Memory", (), {"available": need // 2})())
    with pytest.raises(InputError, match=r"hippocampus_003\.nii\.gz: network prediction: \d+x\d+x\d+ voxels .* GiB available"):
        two.predict(net, image)


def _write_volumes(studies, arrays):
    studies.mkdir(parents=True, exist_ok=True)
    for n, array in enumerate(arrays):
        nib.save(nib.Nifti1Image(array, np.diag([2.0, 2.0, 2.5, 1.0])), str(studies / f"case_{n}.nii.gz"))
    return studies


def _ct_like(rng):
    """A head in air as a scanner stores it: int16 Hounsfield units, -1000 around a soft-tissue body with a bone rim."""
    zz, yy, xx = np.mgrid[:40, :40, :24]
    r = np.sqrt((zz - 20) ** 2 + (yy - 20) ** 2 + ((xx - 12) * 1.25) ** 2)
    hu = np.where(r < 14, 40 + rng.normal(0, 15, r.shape), -1000 + rng.normal(0, 5, r.shape))
    hu[(r >= 12) & (r < 14)] = 900
    return np.rint(hu).astype(np.int16)


def test_ct_is_detected_from_the_data_and_an_explicit_modality_wins(tmp_path):
    """``--conf modality auto`` (the default): integer volumes with air (<= -900 HU) plan as CT and their
    features are normalised by the CT window (the cache's settings id says so); float MRI-like volumes,
    8-bit MRI (integers, no air) and z-scored MRI (negative, no air) plan as MRI. The plan file keeps the
    detected modality; an explicit ``--conf modality`` wins for the run but does not overwrite it."""
    rng = np.random.default_rng(0)
    fast = {k: v for k, v in FAST.items() if k != "labels"}
    ct = _write_volumes(tmp_path / "ct", [_ct_like(rng) for _ in range(3)])
    stage_one = build_stage_one(ct, AppConfig.from_conf(fast))
    assert stage_one.cache.modality == "ct" and "-ct-w-160-240-" in stage_one.cache.settings_id
    written = json.loads((ct / PLAN_FILE).read_text())
    assert written["modality"] == "ct" and all(e["ct"] for e in written["planned_from"]["modality_evidence"])

    mri_like = rng.gamma(2.0, 100.0, (40, 40, 24)).astype(np.float32)
    mri = _write_volumes(tmp_path / "mri", [mri_like, mri_like * 1.1])
    assert build_stage_one(mri, AppConfig.from_conf(fast)).cache.modality == "mri"
    eight_bit = _write_volumes(tmp_path / "uint8", [np.clip(mri_like, 0, 255).astype(np.uint8)])
    assert build_stage_one(eight_bit, AppConfig.from_conf(fast)).cache.modality == "mri"
    zscored = _write_volumes(tmp_path / "zscored", [((mri_like - mri_like.mean()) / mri_like.std()).astype(np.float32)])
    assert build_stage_one(zscored, AppConfig.from_conf(fast)).cache.modality == "mri"
    # a float CT in HU whose values are whole (a converted DICOM series) is still CT; fractional values with air are not
    assert build_stage_one(_write_volumes(tmp_path / "ct_float", [_ct_like(rng).astype(np.float32)]), AppConfig.from_conf(fast)).cache.modality == "ct"
    assert build_stage_one(_write_volumes(tmp_path / "not_hu", [_ct_like(rng) + rng.random((40, 40, 24)).astype(np.float32)]),
                           AppConfig.from_conf(fast)).cache.modality == "mri"

    # the override wins, both ways, and the features go to that normalisation's cache folder
    forced = build_stage_one(ct, AppConfig.from_conf({**fast, "modality": "mri"}))
    assert forced.cache.modality == "mri" and "-mri-p0.5-99.5-" in forced.cache.settings_id
    assert json.loads((ct / PLAN_FILE).read_text())["modality"] == "ct"  # the data's, not the override's
    assert build_stage_one(ct, AppConfig.from_conf(fast)).cache.modality == "ct"  # auto again: detected, not inherited
    assert build_stage_one(mri, AppConfig.from_conf({**fast, "modality": "ct"})).cache.modality == "ct"
    with pytest.raises(ConfError, match="modality"):
        AppConfig.from_conf({"modality": "pet"})
