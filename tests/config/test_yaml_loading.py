"""YAML files load safely, with line numbers, YAML 1.2 floats and clear syntax errors."""

from __future__ import annotations

import pytest

from ava.config import ConfigError, ConfigFiles, WorldSize, load_config
from ava.config.yaml_loader import load_yaml_text, parse_scalar

ONE = WorldSize(1, "test")


def test_exponent_floats_in_yaml_are_floats_not_strings(write_yaml):
    base = write_yaml("b.yaml", """
        training:
          learning_rate: 5e-5
          lr_end: 1e-6
        """)
    cfg = load_config(ConfigFiles(base), world=ONE).config
    assert isinstance(cfg.training.learning_rate, float) and cfg.training.learning_rate == 5e-5
    assert cfg.training.lr_end == 1e-6


def test_exponent_floats_on_the_command_line_are_floats(write_yaml):
    base = write_yaml("b.yaml", "training: {}\n")
    cfg = load_config(ConfigFiles(base), ["--learning_rate", "5e-5", "--training.lr_end=1e-6"], world=ONE).config
    assert cfg.training.learning_rate == 5e-5 and isinstance(cfg.training.learning_rate, float)
    assert cfg.training.lr_end == 1e-6


def test_quoted_number_stays_a_string_and_is_rejected_for_a_float_key(write_yaml):
    assert load_yaml_text('a: "5e-5"\n', "x.yaml").data == {"a": "5e-5"}
    base = write_yaml("b.yaml", 'training:\n  learning_rate: "5e-5"\n')
    with pytest.raises(ConfigError) as err:
        load_config(ConfigFiles(base), world=ONE)
    assert "b.yaml:2" in str(err.value) and "remove the quotes" in str(err.value)


def test_every_key_records_its_line():
    loaded = load_yaml_text("model:\n  hidden_size: 8\n\ntraining:\n  gradient_health:\n    enabled: false\n", "f.yaml")
    assert loaded.lines[("model", "hidden_size")] == 2
    assert loaded.lines[("training", "gradient_health", "enabled")] == 6


def test_duplicate_keys_are_an_error_naming_both_lines():
    with pytest.raises(ConfigError) as err:
        load_yaml_text("training:\n  batch_size: 8\n  batch_size: 16\n", "dup.yaml")
    text = str(err.value)
    assert "dup.yaml:3" in text and "line 2" in text and "training.batch_size" in text


def test_tab_indentation_error_says_use_spaces():
    with pytest.raises(ConfigError) as err:
        load_yaml_text("training:\n\tbatch_size: 8\n", "tabs.yaml")
    assert "tabs.yaml:2" in str(err.value) and "spaces, not tabs" in str(err.value)


def test_python_tags_are_refused_and_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    text = f"training: !!python/object/apply:os.system ['touch {marker}']\n"
    with pytest.raises(ConfigError):
        load_yaml_text(text, "evil.yaml")
    assert not marker.exists()


def test_anchors_and_merge_keys_work():
    loaded = load_yaml_text("x: &d {a: 1, b: 2}\ny:\n  <<: *d\n  b: 3\n", "m.yaml")
    assert loaded.data["y"] == {"a": 1, "b": 3}


@pytest.mark.parametrize("text, expected", [("5e-5", 5e-5), ("1e9", 1e9), ("-2.5E+3", -2500.0), ("3", 3),
                                            ("true", True), ("[0.9, 0.95]", [0.9, 0.95]), ("abc", "abc")])
def test_cli_values_parse_like_yaml(text, expected):
    assert parse_scalar(text) == expected and type(parse_scalar(text)) is type(expected)


def test_empty_file_is_an_empty_layer(write_yaml):
    base = write_yaml("b.yaml", "training:\n  batch_size: 3\n")
    empty = write_yaml("hw.yaml", "# nothing here\n")
    assert load_config(ConfigFiles(base, empty), world=ONE).config.training.batch_size == 3
