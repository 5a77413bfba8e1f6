"""A warmup that does not fit a shorter run: lowered when it comes from a lower layer, an error in the same layer."""

from __future__ import annotations

import pytest

from ava.config import ConfigError, ConfigFiles, WorldSize, load_config
from ava.config.provenance import Layer

ONE = WorldSize(1, "test")
LONG_RUN = "training:\n  max_steps: 100\n  warmup_steps: 10\n"  # tiny.yaml's schedule


def _note(resolved, key: str = "training.warmup_steps") -> str:
    notes = [n.render() for n in resolved.notices if n.level == "note" and n.key == key]
    assert len(notes) == 1, [n.render() for n in resolved.notices]
    return notes[0]


def test_a_shorter_max_steps_on_the_command_line_lowers_the_files_warmup_with_a_note(write_yaml):
    base = write_yaml("long.yaml", LONG_RUN)
    resolved = load_config(ConfigFiles(base), ["--max_steps", "8"], world=ONE)
    assert (resolved.config.training.max_steps, resolved.config.training.warmup_steps) == (8, 0)
    assert resolved.origin("training.warmup_steps").layer is Layer.DERIVED
    assert f"replaces 10 from {base}:3" in resolved.origin("training.warmup_steps").describe()
    note = _note(resolved)
    assert note.startswith(f"note: {base}:3: training.warmup_steps: lowered from 10 to 0")
    assert "command line (--max_steps 8)" in note and "--warmup_steps N (below 8)" in note


@pytest.mark.parametrize("max_steps, warmup", [(9, 0), (10, 1), (50, 5), (1, 0)])
def test_the_lowered_warmup_is_a_tenth_of_the_run_and_always_below_it(write_yaml, max_steps, warmup):
    resolved = load_config(ConfigFiles(write_yaml("long.yaml", "training:\n  max_steps: 1000\n  warmup_steps: 1000\n")),
                           ["--max_steps", str(max_steps)], world=ONE)
    assert resolved.config.training.warmup_steps == warmup < max_steps


def test_a_warmup_that_already_fits_is_left_alone(write_yaml):
    resolved = load_config(ConfigFiles(write_yaml("long.yaml", LONG_RUN)), ["--max_steps", "50"], world=ONE)
    assert resolved.config.training.warmup_steps == 10
    assert resolved.origin("training.warmup_steps").layer is Layer.BASE
    assert not [n for n in resolved.notices if n.key == "training.warmup_steps"]


def test_a_max_steps_from_the_hardware_layer_also_lowers_the_base_files_warmup(write_yaml):
    hardware = write_yaml("hw.yaml", "training:\n  max_steps: 5\n")
    resolved = load_config(ConfigFiles(write_yaml("long.yaml", LONG_RUN), hardware_config=hardware), world=ONE)
    assert resolved.config.training.warmup_steps == 0
    assert f"{hardware}:2" in _note(resolved)


def test_the_schema_default_warmup_is_lowered_too(write_yaml):
    resolved = load_config(ConfigFiles(write_yaml("short.yaml", "training:\n  max_steps: 3\n")), world=ONE)
    assert resolved.origin("training.warmup_steps").layer is Layer.DERIVED
    assert resolved.config.training.warmup_steps == 0


@pytest.mark.parametrize("text, argv, fix", [
    # Both keys in one file: the user wrote the contradiction, so it stays an error with the largest valid warmup.
    ("training:\n  max_steps: 8\n  warmup_steps: 10\n", [], "Fix: set warmup_steps to at most 7"),
    # Both on the command line.
    (LONG_RUN, ["--max_steps", "8", "--warmup_steps", "8"], "Fix: set warmup_steps to at most 7"),
    # The warmup is the later (higher) layer: the user chose it for this run.
    ("training:\n  max_steps: 8\n", ["--warmup_steps", "20"], "Fix: set warmup_steps to at most 7"),
])
def test_a_warmup_set_in_the_same_or_a_higher_layer_than_max_steps_is_still_an_error(write_yaml, text, argv, fix):
    with pytest.raises(ConfigError) as err:
        load_config(ConfigFiles(write_yaml("c.yaml", text)), argv, world=ONE)
    assert "must be smaller than training.max_steps = 8" in str(err.value) and fix in str(err.value)
