"""Cached registrations: stored without ITK's HDF5 files, read back exactly, and safe to read from
many request threads at once (the threaded server's pattern)."""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import SimpleITK as sitk
from semisam_o1.stage_one.plan import Plan
from semisam_o1.stage_one.registration import (RegistrationCache, affine_register, ants_affine_register, demons_register, load_transform,
                                               map_voxels, read_image, save_transform, shrink)


def _pair(sample_source):
    images = sorted(sample_source.images.glob("hippocampus_*.nii.gz"))[:2]
    return read_image(str(images[0])), read_image(str(images[1]))


def test_a_stored_registration_maps_every_voxel_as_the_original(sample_source, tmp_path):
    fixed, moving = _pair(sample_source)
    affine = affine_register(fixed, moving)
    demons = demons_register(fixed, moving, affine, iterations=5)
    for name, transform in {"affine": affine, "demons": demons}.items():
        path = save_transform(transform, tmp_path / f"{name}.npz")
        back = load_transform(path)
        want, got = map_voxels(fixed, transform, moving), map_voxels(fixed, back, moving)
        assert np.abs(want - got).max() < 1e-3, name  # float32 field on disk: far below a voxel
        assert not any(p.suffix == ".h5" for p in tmp_path.iterdir())


def test_the_ants_affine_finds_a_known_shift_and_is_cached_under_its_own_name(sample_source, tmp_path):
    """``--set stage_one.demons_affine=ants``: the demons start from ANTs' affine. A template moved by a known
    3 mm / -2 mm shift is found again (to well under a voxel), and its registrations never mix with the default's."""
    fixed, _ = _pair(sample_source)
    shift = sitk.TranslationTransform(3, (3.0, -2.0, 0.0))
    moving = sitk.Resample(fixed, fixed, shift, sitk.sitkLinear, 0.0)  # moving(x) = fixed(x + shift): fixed -> moving is -shift
    found = ants_affine_register(fixed, moving)
    centre = fixed.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in fixed.GetSize()])
    moved = np.subtract(found.TransformPoint(centre), centre)
    assert np.abs(moved - (-3.0, 2.0, 0.0)).max() < 0.5, moved
    back = load_transform(save_transform(found, tmp_path / "a.npz"))
    assert np.abs(map_voxels(fixed, back, moving) - map_voxels(fixed, found, moving)).max() < 1e-6
    images = sorted(sample_source.images.glob("hippocampus_*.nii.gz"))[:2]
    names = {a: RegistrationCache(tmp_path, Plan(demons_affine=a)).path(images[0], images[1], "demons").name for a in ("sitk", "ants")}
    assert "-affine-demons" in names["sitk"] and "-antsaffine-demons" in names["ants"]


def test_many_threads_read_registrations_and_images_at_once(sample_source, tmp_path, thread_switches_in_gc):
    fixed, moving = _pair(sample_source)
    transform = demons_register(fixed, moving, affine_register(fixed, moving), iterations=5)
    paths = [save_transform(transform, tmp_path / f"t{i}.npz") for i in range(4)]
    image = sorted(sample_source.images.glob("hippocampus_*.nii.gz"))[0]
    want = map_voxels(fixed, transform, moving)

    def work(i):
        back = load_transform(paths[i % len(paths)])
        read_image(str(image))
        return float(np.abs(map_voxels(fixed, back, moving) - want).max())

    with ThreadPoolExecutor(8) as pool:
        errors = list(pool.map(work, range(64)))
    assert max(errors) < 1e-3


def test_shrunk_registration_grid_is_stored_too(sample_source, tmp_path):
    fixed, moving = _pair(sample_source)
    small = shrink(fixed, (2, 2, 1))
    transform = demons_register(small, shrink(moving, (2, 2, 1)), affine_register(small, shrink(moving, (2, 2, 1))), iterations=3)
    back = load_transform(save_transform(transform, tmp_path / "s.npz"))
    field = sitk.DisplacementFieldTransform(sitk.CompositeTransform(back).GetNthTransform(1)).GetDisplacementField()
    assert field.GetSize() == small.GetSize() and np.allclose(field.GetSpacing(), small.GetSpacing())


def test_ants_syn_gives_the_same_field_in_every_process_and_leaves_the_environment_as_it_was(sample_source):
    """The same pair here and in a fresh process (a rerun, a job, a Ray worker): identical displacement
    fields. Unseeded ANTs on several threads differs run to run by up to ~1 mm here (and its affine can
    fail outright on some pairs), which made Ray runs, reruns and the benchmarks' ANTs peer disagree.
    The caller's seed and thread variables are untouched afterwards."""
    import hashlib
    import os
    import subprocess
    import sys

    from semisam_o1.stage_one.registration import syn_register

    paths = [str(sample_source.images / f"{c}.nii.gz") for c in ("hippocampus_003", "hippocampus_001")]
    child = ("import hashlib, sys, SimpleITK as sitk\n"
             "from semisam_o1.stage_one.registration import read_image, syn_register\n"
             "field = syn_register(read_image(sys.argv[1]), read_image(sys.argv[2])).GetDisplacementField()\n"
             "print(hashlib.sha256(sitk.GetArrayFromImage(field).tobytes()).hexdigest())\n")
    before = {k: os.environ.get(k) for k in ("ANTS_RANDOM_SEED", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS")}
    field = sitk.GetArrayFromImage(syn_register(read_image(paths[0]), read_image(paths[1])).GetDisplacementField())
    assert {k: os.environ.get(k) for k in before} == before
    assert np.abs(field).max() > 0.5  # a real deformation, not an identity
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": "2"}
    out = subprocess.run([sys.executable, "-c", child, *paths], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split()[-1] == hashlib.sha256(field.tobytes()).hexdigest()


def test_map_voxels_agrees_with_simpleitk_index_mapping_from_the_image_or_its_grid_alone(sample_source):
    """``map_voxels`` = SimpleITK's own chain (index -> physical point -> transform -> moving continuous
    index) at every voxel checked, for whole volumes and slab ranges; stage one passes the header-only
    grid (no voxels read) and gets the same map, and ``warp_label`` the same warp."""
    from semisam_o1.stage_one.registration import warp_label
    from semisam_o1.volumes import read_sitk, read_sitk_grid

    images = sorted(sample_source.images.glob("hippocampus_*.nii.gz"))[:2]
    fixed, moving = _pair(sample_source)
    transform = demons_register(fixed, moving, affine_register(fixed, moving), iterations=5)
    whole = map_voxels(fixed, transform, moving)
    rng = np.random.default_rng(0)
    for i, j, k in rng.integers(0, fixed.GetSize(), size=(50, 3)):
        point = transform.TransformPoint(fixed.TransformIndexToPhysicalPoint((int(i), int(j), int(k))))
        want = moving.TransformPhysicalPointToContinuousIndex(point)
        assert np.allclose(whole[i, j, k], want, atol=1e-3), (i, j, k)
    fixed_grid, moving_grid = read_sitk_grid(images[0]), read_sitk_grid(images[1])
    assert tuple(fixed_grid.GetSize()) == tuple(fixed.GetSize())
    slab = map_voxels(fixed_grid, transform, moving_grid, 5, 9)
    assert slab.shape == (4, *whole.shape[1:]) and np.allclose(slab, whole[5:9], atol=1e-4)
    label = read_sitk(sample_source.labels / images[1].name, sitk.sitkUInt8)
    assert np.array_equal(warp_label(label, fixed_grid, transform), warp_label(label, fixed, transform))
