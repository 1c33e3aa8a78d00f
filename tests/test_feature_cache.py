"""Feature cache: encode once, hit without the encoder, invalidate on image or settings change; the
streamed, strided store equals projecting the dense features; lookups interpolate the stored grid."""

import shutil

import numpy as np
import pytest
from semisam_o1.stage_one.encoders import EncoderSpec
from semisam_o1.stage_one.feature_cache import FeatureCache, FeatureGrid
from semisam_o1.stage_one.normalize import normalize
from semisam_o1.stage_one.plan import Plan
from semisam_o1.volumes import load_image

SPEC = EncoderSpec(image_size=32, axes=(0,))


@pytest.fixture()
def image(sample_source, tmp_path):
    path = tmp_path / "studies" / "case.nii.gz"
    path.parent.mkdir()
    shutil.copy(sample_source.images / "hippocampus_003.nii.gz", path)
    return load_image(path)


def test_miss_encodes_and_stores_compressed_features(image):
    cache = FeatureCache(image.path.parent, SPEC, dims=8, plan=Plan(feature_stride=1))
    assert cache.get(image) is None
    feats = cache.get_or_compute(image)
    assert feats.values.shape == (*image.array.shape, 8) and feats.values.dtype == np.float16
    assert feats.dense().shape == (8, *image.array.shape)
    assert cache.path(image.path).stat().st_size <= 16 * image.array.size + 1024  # 8 dims x 2 bytes + header
    assert (cache.root / "basis.npz").exists()


def test_strided_store_is_the_projection_of_the_dense_features(image):
    """Streaming per axis and slice batch, then projecting, gives what projecting the full feature
    volume gives (the old, memory-hungry way), at every stored voxel; 2 x 2 x 2 fewer voxels on disk."""
    spec = EncoderSpec(image_size=32, axes=(0, 2))
    cache = FeatureCache(image.path.parent, spec, dims=8, plan=Plan(feature_stride=2))
    grid = cache.get_or_compute(image)
    assert grid.stride == (2, 2, 2) and grid.values.shape == (17, 26, 18, 8)
    assert cache.path(image.path).stat().st_size <= 2.2 * image.array.size + 1024  # 8 dims x 2 bytes / ~8 + header
    raw = cache.encoder.encode(normalize(image.array, "mri"))[:, ::2, ::2, ::2]  # (512, 17, 26, 18)
    flat = raw.reshape(raw.shape[0], -1).T
    flat = flat / (np.linalg.norm(flat, axis=1, keepdims=True) + 1e-6)
    with np.load(cache.root / "basis.npz") as z:
        expected = (flat - z["mean"]) @ z["components"]
    np.testing.assert_allclose(grid.sample(), expected, atol=2e-3, rtol=1e-2)


def test_lookup_interpolates_between_stored_voxels():
    values = np.arange(3 * 2 * 2, dtype=np.float32).reshape(3, 2, 2, 1)  # stored at voxels 0, 2, 4 / 0, 3 / 0, 3
    grid = FeatureGrid(values, (2, 3, 3), (5, 4, 4))
    np.testing.assert_array_equal(grid.at(np.array([[2, 3, 0], [4, 0, 3]])), values[[1, 2], [1, 0], [0, 1]])
    mid = grid.at(np.array([[1, 0, 0], [3, 3, 3], [1, 1.5, 0]]))[:, 0]
    np.testing.assert_allclose(mid, [(0 + 4) / 2, (7 + 11) / 2, (0 + 4 + 2 + 6) / 4])
    assert grid.at(np.array([[9, -3, 0]]))[0, 0] == values[2, 0, 0, 0]  # clamped to the border
    assert grid.dense().shape == (1, 5, 4, 4)


def test_hit_reads_disk_and_never_builds_the_encoder(image):
    first = FeatureCache(image.path.parent, SPEC, dims=8).get_or_compute(image)
    again = FeatureCache(image.path.parent, SPEC, dims=8)
    np.testing.assert_array_equal(again.get_or_compute(image).values, first.values)
    assert again._encoder is None


def test_changed_image_content_is_encoded_again(image, sample_source):
    cache = FeatureCache(image.path.parent, SPEC, dims=8)
    cache.get_or_compute(image)
    shutil.copy(sample_source.images / "hippocampus_008.nii.gz", image.path)  # same name, new content
    changed = load_image(image.path)
    assert cache.get(changed) is None
    assert cache.get_or_compute(changed).shape == changed.array.shape


def test_other_settings_use_another_folder(image):
    a = FeatureCache(image.path.parent, SPEC, dims=8)
    b = FeatureCache(image.path.parent, EncoderSpec(image_size=64, axes=(0,)), dims=8)
    c = FeatureCache(image.path.parent, SPEC, dims=8, modality="ct")
    assert len({a.root, b.root, c.root}) == 3
    a.get_or_compute(image)
    assert b.get(image) is None and c.get(image) is None


def test_two_processes_starting_at_once_share_one_basis(image, sample_source):
    """The server and a background job encoding their first images at the same moment: the PCA basis
    is fitted once (file lock) and both images' features are in that one space."""
    import subprocess
    import sys

    other = image.path.parent / "other.nii.gz"
    shutil.copy(sample_source.images / "hippocampus_008.nii.gz", other)
    code = (
        "import sys; from pathlib import Path; from semisam_o1.stage_one.encoders import EncoderSpec; "
        "from semisam_o1.stage_one.feature_cache import FeatureCache; from semisam_o1.stage_one.plan import Plan; "
        "from semisam_o1.volumes import load_image; p = Path(sys.argv[1]); "
        "FeatureCache(p.parent, EncoderSpec(image_size=32, axes=(0,)), dims=8, plan=Plan(feature_stride=1)).get_or_compute(load_image(p))"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code, str(path)]) for path in (image.path, other)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    cache = FeatureCache(image.path.parent, SPEC, dims=8, plan=Plan(feature_stride=1))
    with np.load(cache.root / "basis.npz") as z:
        mean, components = z["mean"], z["components"]
    for path in (image.path, other):
        volume = load_image(path)
        raw = cache.encoder.encode(normalize(volume.array, "mri"))
        flat = raw.reshape(raw.shape[0], -1).T
        flat = flat / (np.linalg.norm(flat, axis=1, keepdims=True) + 1e-6)
        np.testing.assert_allclose(cache.get(volume).sample(), (flat - mean) @ components, atol=2e-3, rtol=1e-2)


def test_unit_rows_are_cosine_geometry_and_leave_the_input_alone():
    from semisam_o1.stage_one.feature_cache import unit_rows

    x = np.array([[3.0, 4.0], [0.0, 0.0], [-1.0, 1.0]], np.float32)
    unit = unit_rows(x)
    np.testing.assert_allclose(unit, [[0.6, 0.8], [0.0, 0.0], [-2 ** -0.5, 2 ** -0.5]], rtol=1e-6)
    assert unit.dtype == np.float32 and x[0, 0] == 3.0
    np.testing.assert_allclose(unit_rows(x.astype(np.float16).reshape(3, 1, 2)), unit.reshape(3, 1, 2), rtol=1e-3)
