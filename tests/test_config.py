import pytest

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
