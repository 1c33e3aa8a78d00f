"""Feature cache: encode once, hit without the encoder, invalidate on image or settings change."""

import shutil

import numpy as np
import pytest

from semisam_o1.encoders import EncoderSpec
from semisam_o1.feature_cache import FeatureCache
from semisam_o1.volumes import load_image

SPEC = EncoderSpec(image_size=32, axes=(0,))


@pytest.fixture()
def image(sample_source, tmp_path):
    path = tmp_path / "studies" / "case.nii.gz"
    path.parent.mkdir()
    shutil.copy(sample_source.images / "hippocampus_003.nii.gz", path)
    return load_image(path)


def test_miss_encodes_and_stores_compressed_features(image):
    cache = FeatureCache(image.path.parent, SPEC, dims=8)
    assert cache.get(image) is None
    feats = cache.get_or_compute(image)
    assert feats.shape == (8, *image.array.shape) and feats.dtype == np.float16
    assert cache.path(image.path).stat().st_size <= 16 * image.array.size + 1024  # 8 dims x 2 bytes + header
    assert (cache.root / "basis.npz").exists()


def test_hit_reads_disk_and_never_builds_the_encoder(image):
    first = FeatureCache(image.path.parent, SPEC, dims=8).get_or_compute(image)
    again = FeatureCache(image.path.parent, SPEC, dims=8)
    np.testing.assert_array_equal(again.get_or_compute(image), first)
    assert again._encoder is None


def test_changed_image_content_is_encoded_again(image, sample_source):
    cache = FeatureCache(image.path.parent, SPEC, dims=8)
    cache.get_or_compute(image)
    shutil.copy(sample_source.images / "hippocampus_008.nii.gz", image.path)  # same name, new content
    changed = load_image(image.path)
    assert cache.get(changed) is None
    assert cache.get_or_compute(changed).shape[1:] == changed.array.shape


def test_other_settings_use_another_folder(image):
    a = FeatureCache(image.path.parent, SPEC, dims=8)
    b = FeatureCache(image.path.parent, EncoderSpec(image_size=64, axes=(0,)), dims=8)
    c = FeatureCache(image.path.parent, SPEC, dims=8, modality="ct")
    assert len({a.root, b.root, c.root}) == 3
    a.get_or_compute(image)
    assert b.get(image) is None and c.get(image) is None
