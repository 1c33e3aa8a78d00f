import json
import subprocess
import sys
from pathlib import Path

import pytest
from semisam_o1.choices import ENCODERS
from semisam_o1.config import AppConfig, parse_label_map
from semisam_o1.parsers import ConfError


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
    ("stage_one.encoder_axes", "2,0", (2, 0)),
    ("rounds", "5", 5),
    ("iterations", "auto", None),  # planned (plan.json network_iterations)
    ("iterations", "250", 250),
    ("ray_address", "10.0.0.2:6379", "10.0.0.2:6379"),
    ("ray_address", "ray://head:10001", "ray://head:10001"),
    ("stage_two.refinement", "volume", "volume"),
    ("train.patch", "48", (48, 48, 48)),
    ("stage_two.replace_confidence", "auto", None),
    ("stage_two.warm_start", "false", False),
    ("device", "CPU", "cpu"),
])
def test_each_conf_parser_gives_the_typed_value(key, text, value):
    assert AppConfig.parse_option(key, text) == value


@pytest.mark.parametrize("key, text, message", [
    ("stage_one.encoder_axes", "0,3", "stage_one.encoder_axes"),
    ("stage_one.encoder_axes", "0,0", "stage_one.encoder_axes: '0,0' repeats a value"),
    ("stage_one.encoder_axes", "", "stage_one.encoder_axes"),
    ("stage_two.warm_lr", "11", r"--set stage_two.warm_lr: '11' is not in \[0.1, 10.0\]"),
    ("stage_two.ensembel", "mean", "stage_two.ensembel: unknown setting; stage_two has refinement, mc_samples"),
    ("stage_three.x", "1", "unknown section 'stage_three'"),
    ("stage_two.rounds", "2", "an operator option, set it with --conf rounds"),
    ("rounds", "0", "rounds"),
    ("rounds", "three", "rounds"),
    ("ray_address", "http://head:6379", "not a Ray address"),
    ("stage_two.refinement", "knn", "not one of voxel, volume, none"),
    ("refinement", "none", "refinement: unknown option"),
    ("device", "tpu", "device"),
])
def test_a_bad_conf_value_is_an_error_naming_the_key(key, text, message):
    with pytest.raises(ConfError, match=message):
        AppConfig.from_conf({key: text})


def test_options_parse_without_loading_torch_or_an_implementation():
    # the choice lists live in config so that `serve --help` and option errors cost no torch import
    code = ("import sys; from semisam_o1.config import AppConfig; AppConfig.from_conf({'encoder': 'litemedsam', 'stage_two.ensemble': 'anchored'}); "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('semisam_o1.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == str(["semisam_o1.choices", "semisam_o1.config", "semisam_o1.parsers", "semisam_o1.research",
                               "semisam_o1.stage_one", "semisam_o1.stage_one.params",
                               "semisam_o1.stage_two", "semisam_o1.stage_two.params"])


@pytest.mark.parametrize("name", ENCODERS)
def test_every_encoder_option_is_one_the_encoder_spec_accepts(name, tmp_path):
    from semisam_o1.stage_one.encoders import EncoderSpec

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


def test_research_settings_reach_the_params_and_only_differences_are_recorded(tmp_path):
    """``--set`` becomes conf keys ``section.field``; a ``--params`` file (JSON or YAML) holds the same, and a
    ``--set`` of the same field wins over the file."""
    from semisam_o1.cli import _conf_pairs

    (tmp_path / "p.json").write_text('{"stage_two": {"warm_lr": 3, "ensemble": "mean"}, "train.patch": 24}')
    (tmp_path / "p.yaml").write_text("stage_two:\n  warm_lr: 3\n  ensemble: mean\ntrain:\n  patch: 24\n")
    for name in ("p.json", "p.yaml"):
        conf = _conf_pairs([["rounds", "2"]], settings=["stage_two.warm_lr=4", "stage_one.registration=demons"], params=tmp_path / name)
        config = AppConfig.from_conf(conf)
        two = config.stage_two_params()
        assert (two.rounds, two.warm_lr, two.ensemble, two.train.patch) == (2, 4.0, "mean", (24, 24, 24))
        assert config.stage_one_params().registration == "demons"
    # a setting given at its default is not recorded (the config equals the default one)
    assert AppConfig.from_conf({"stage_two.warm_lr": "2"}) == AppConfig()
    with pytest.raises(ConfError, match="SECTION.FIELD=VALUE"):
        _conf_pairs(None, settings=["warm_lr=2"])
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfError, match="bad.json cannot be read"):
        AppConfig.from_conf({"params": str(tmp_path / "bad.json")})


def test_each_default_is_written_once_in_its_dataclass():
    """The operator options that are also pipeline settings take their defaults from the dataclass, and the app's
    stage-two params with no option given equal the dataclass's own (but for the planned iterations)."""
    import dataclasses

    from semisam_o1.stage_two.params import StageTwoParams, TrainParams

    config = AppConfig()
    assert config.rounds == StageTwoParams.rounds and config.train_processes == TrainParams.processes
    planned = dataclasses.replace(StageTwoParams(), train=dataclasses.replace(TrainParams(), iterations=None))
    assert config.stage_two_params() == planned
    research = {f.name for f in dataclasses.fields(AppConfig)} & {f.name for f in dataclasses.fields(StageTwoParams)}
    assert research == {"rounds"}  # the one operator option that is a stage-two field


def test_params_command_lists_every_research_setting_with_its_default():
    out = subprocess.run([sys.executable, "main.py", "params", "--json"], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout
    rows = {r["key"]: r for r in json.loads(out)}
    assert rows["stage_two.warm_lr"]["default"] == "2.0" and rows["stage_one.registration"]["default"] == "demons+syn"
    assert "peak learning rate" in rows["stage_two.warm_lr"]["help"]
    assert "stage_two.rounds" not in rows and "train.iterations" not in rows  # operator options, in --conf


def test_evaluate_table_keeps_long_class_names_apart():
    from semisam_o1.cli import evaluation_table

    result = {"mean": {"liver": {"dice": 0.9, "hd95": 3.0}, "right_kidney": {"dice": 0.8, "hd95": 4.0}},
              "cases": {"chaos_1": {"liver": {"dice": 0.9, "hd95": 3.0}, "right_kidney": {"dice": 0.8, "hd95": 4.0}}}}
    header, *rows = evaluation_table(result).splitlines()
    assert header.split() == ["case", "liver", "Dice", "liver", "HD95", "right_kidney", "Dice", "right_kidney", "HD95"]
    assert "HD95right_kidney" not in header and rows[-1].split()[0] == "mean"
    assert all(len(r) == len(header) for r in rows)


def test_readme_tables_are_what_main_py_docs_writes():
    """README.md's results, options and research-settings tables are generated (python main.py docs)."""
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "main.py", "docs", "--check"], capture_output=True, text=True, cwd=root)
    assert done.returncode == 0, done.stderr
