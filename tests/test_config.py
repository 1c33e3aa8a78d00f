import subprocess
import sys

import pytest

from semisam_o1.choices import ENCODERS
from semisam_o1.config import AppConfig, ConfError, parse_label_map


def test_label_map_parses_names_and_indices():
    assert parse_label_map("anterior=1, posterior=2") == {"anterior": 1, "posterior": 2}


@pytest.mark.parametrize("text", ["anterior", "anterior=0", "a=1,b=1", "a=1,a=2", "a=x"])
def test_bad_label_map_is_rejected(text):
    with pytest.raises(ConfError):
        parse_label_map(text)


def test_unknown_conf_key_names_the_key():
    with pytest.raises(ConfError, match="--conf lables: unknown option"):
        AppConfig.from_conf({"lables": "a=1"})


def test_monai_label_own_keys_are_accepted():
    assert AppConfig.from_conf({"server_mode": "true", "labels": "a=1"}).labels == {"a": 1}


@pytest.mark.parametrize("key, text, value", [
    ("encoder_axes", "2,0", (2, 0)),
    ("rounds", "5", 5),
    ("iterations", "auto", None),  # planned (plan.json network_iterations)
    ("iterations", "250", 250),
    ("ray_address", "10.0.0.2:6379", "10.0.0.2:6379"),
    ("ray_address", "ray://head:10001", "ray://head:10001"),
    ("refinement", "volume", "volume"),
    ("device", "CPU", "cpu"),
])
def test_each_conf_parser_gives_the_typed_value(key, text, value):
    assert AppConfig.parse_option(key, text) == value


@pytest.mark.parametrize("key, text, message", [
    ("encoder_axes", "0,3", "encoder_axes"),
    ("encoder_axes", "", "encoder_axes"),
    ("rounds", "0", "rounds"),
    ("rounds", "three", "rounds"),
    ("ray_address", "http://head:6379", "not a Ray address"),
    ("refinement", "knn", "not one of voxel, volume, none"),
    ("device", "tpu", "device"),
])
def test_a_bad_conf_value_is_an_error_naming_the_key(key, text, message):
    with pytest.raises(ConfError, match=message):
        AppConfig.from_conf({key: text})


def test_options_parse_without_loading_torch_or_an_implementation():
    # the choice lists live in config so that `serve --help` and option errors cost no torch import
    code = ("import sys; from semisam_o1.config import AppConfig; AppConfig.from_conf({'encoder': 'litemedsam', 'ensemble': 'anchored'}); "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('semisam_o1.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['semisam_o1.choices', 'semisam_o1.config']"


@pytest.mark.parametrize("name", ENCODERS)
def test_every_encoder_option_is_one_the_encoder_spec_accepts(name, tmp_path):
    from semisam_o1.encoders import EncoderSpec

    checkpoint = tmp_path / "sam.pth"
    checkpoint.write_bytes(b"weights")
    assert EncoderSpec(name=name, checkpoint=str(checkpoint) if name.startswith("sam_") else None).name == name
    with pytest.raises(ConfError, match="encoder"):
        AppConfig.from_conf({"encoder": name + "x"})


def test_every_command_prints_its_help_with_every_option_described():
    """``main.py <command> --help`` lists every ``--conf`` option (argparse %-formats help text: an option
    whose description holds a ``%`` once made ``pipeline --help`` crash)."""
    from semisam_o1.cli import build_parser
    from semisam_o1.config import OPTIONS

    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    for name in commands:
        text = commands[name].format_help()
        if name in ("serve", "pipeline"):
            assert all(key in text for key, _ in OPTIONS), name
