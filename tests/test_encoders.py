"""Encoder contract: volume (D, H, W) in [0, 1] -> features (C, D, H, W), with the real LiteMedSAM weights."""

import numpy as np
import pytest
import torch
from semisam_o1.stage_one.encoders import EncoderError, EncoderSpec, LiteMedSAMEncoder, SAMEncoder


@pytest.fixture(scope="module")
def tiny_volume():
    rng = np.random.default_rng(0)
    vol = np.zeros((6, 9, 7), np.float32)
    vol[2:5, 3:7, 2:6] = 1.0  # a bright block, so features are not just noise
    return np.clip(vol + 0.1 * rng.standard_normal(vol.shape).astype(np.float32), 0, 1)


@pytest.mark.parametrize("image_size", [32, 64])
def test_litemedsam_any_input_size_gives_voxel_features(tiny_volume, image_size):
    enc = LiteMedSAMEncoder(image_size=image_size, axes=(0, 2))
    feats = enc.encode(tiny_volume)
    assert feats.shape == (512, 6, 9, 7) and feats.dtype == np.float32
    assert np.isfinite(feats).all()
    np.testing.assert_array_equal(feats, enc.encode(tiny_volume))  # deterministic
    assert enc.id == f"litemedsam-s{image_size}-ax02-79d8c9dca6db"


def test_litemedsam_features_see_the_image(tiny_volume):
    enc = LiteMedSAMEncoder(image_size=32, axes=(0,))
    feats = enc.encode(tiny_volume)
    inside, outside = feats[:, 3, 5, 4], feats[:, 0, 0, 0]
    assert np.linalg.norm(inside - outside) > 0.1 * np.linalg.norm(outside)
    assert not np.allclose(feats, enc.encode(1.0 - tiny_volume))


def test_spec_id_matches_built_encoder_without_loading():
    spec = EncoderSpec(image_size=32, axes=(1,))
    assert spec.id == spec.build().id


def test_sam_vit_b_shape_contract_with_random_weights(tiny_volume):
    torch.manual_seed(0)
    enc = SAMEncoder("vit_b", checkpoint=None, axes=(0,), batch_size=1)
    feats = enc.encode(tiny_volume[:1, :5, :4])  # one 1024 px slice: ViT-B is slow on CPU
    assert feats.shape == (256, 1, 5, 4)
    assert np.isfinite(feats).all()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"name": "sam_vit_b"}, "needs --conf encoder_checkpoint"),
        ({"name": "dinov2"}, "unknown encoder"),
        ({"image_size": 48}, "multiple of 32"),
        ({"axes": (3,)}, "axes"),
    ],
)
def test_bad_encoder_settings_are_refused(kwargs, message):
    with pytest.raises(EncoderError, match=message):
        EncoderSpec(**kwargs)


def test_unreadable_or_wrong_sam_checkpoint_is_named(tmp_path):
    missing = tmp_path / "missing.pth"
    with pytest.raises(EncoderError, match=str(missing)):
        EncoderSpec("sam_vit_b", str(missing)).id
    wrong = tmp_path / "wrong.pth"
    torch.save({"not": torch.zeros(1)}, wrong)
    with pytest.raises(EncoderError, match=str(wrong)):
        EncoderSpec("sam_vit_b", str(wrong)).build()
