"""Command-line flags map to exactly one key and are parsed by that key's type."""

from __future__ import annotations

import pytest

from ava.config import ConfigError, ConfigFiles, WorldSize, load_config
from ava.config.provenance import Layer

ONE = WorldSize(1, "test")


@pytest.fixture
def base(write_yaml):
    return write_yaml("b.yaml", "training:\n  batch_size: 8\n  max_steps: 1000\n  warmup_steps: 100\n"
                                "  lr_end: 1e-6\n")


def test_the_guides_flat_flags_reach_their_keys(base):
    r = load_config(ConfigFiles(base), ["--batch_size", "32", "--learning_rate", "5e-5", "--num_epochs", "20",
                                        "--warmup_steps", "50", "--max_steps", "100"], world=ONE)
    t = r.config.training
    assert (t.batch_size, t.learning_rate, t.num_epochs, t.warmup_steps, t.max_steps) == (32, 5e-5, 20, 50, 100)
    # warmup_steps means training.warmup_steps, never the nested gradient_health.warmup_steps
    assert t.gradient_health.warmup_steps == 2000
    assert r.origin("training.batch_size").detail == "--batch_size 32"


def test_dotted_overrides_with_space_or_equals(base):
    r = load_config(ConfigFiles(base), ["--training.learning_rate", "5e-5", "--model.num_experts=8",
                                        "--deepspeed.zero_stage", "3"], world=ONE)
    assert r.config.training.learning_rate == 5e-5
    assert r.config.model.num_experts == 8 and r.config.deepspeed.zero_stage == 3
    assert r.origin("model.num_experts").layer is Layer.CLI


def test_flat_name_of_two_different_keys_is_an_error_listing_both(base):
    with pytest.raises(ConfigError) as err:
        load_config(ConfigFiles(base), ["--train_batch_size", "4"], world=ONE)
    text = str(err.value)
    assert "--data.train_batch_size" in text and "--deepspeed.train_batch_size" in text and "ambiguous" in text


def test_flat_name_shared_by_aliases_of_one_setting_is_not_ambiguous(base):
    r = load_config(ConfigFiles(base), ["--gradient_accumulation_steps", "2"], world=ONE)
    assert r.config.training.gradient_accumulation_steps == 2
    assert r.config.deepspeed.gradient_accumulation_steps == 2


def test_bare_boolean_flag_means_true_and_explicit_values_parse(base):
    r = load_config(ConfigFiles(base), ["--deepspeed.zero_stage", "2", "--deepspeed.cpu_offload",
                                        "--training.gradient_health.enabled", "false",
                                        "--training.gradient_checkpointing", "0"], world=ONE)
    assert r.config.deepspeed.cpu_offload is True
    assert r.config.training.gradient_health.enabled is False
    assert r.config.training.gradient_checkpointing is False


def test_string_keys_keep_the_text_verbatim(base):
    r = load_config(ConfigFiles(base), ["--data.data_dir", "1e5", "--data.tokenizer_name=true"], world=ONE)
    assert r.config.data.data_dir == "1e5" and r.config.data.tokenizer_name == "true"


def test_null_on_the_command_line_resets_to_default(base):
    r = load_config(ConfigFiles(base), ["--max_steps", "null", "--warmup_steps", "10"], world=ONE)
    assert r.config.training.max_steps == 40000 and r.origin("training.max_steps").layer is Layer.DEFAULT


def test_wrong_type_on_the_command_line_names_the_flag(base):
    with pytest.raises(ConfigError) as err:
        load_config(ConfigFiles(base), ["--batch_size", "many"], world=ONE)
    assert "--batch_size many" in str(err.value) and "whole number" in str(err.value)


def test_unknown_flags_suggest_the_intended_key(base):
    with pytest.raises(ConfigError) as err:
        load_config(ConfigFiles(base), ["--learning_rat", "1", "--model.hiden_size", "8"], world=ONE)
    text = str(err.value)
    assert "did you mean --learning_rate" in text and "--model.hidden_size" in text
    assert "2 problems" in text


def test_launcher_arguments_are_accepted_and_give_the_dry_run_world_size():
    from ava.cli.args import add_stack_arguments, new_parser, stack_from

    parser = new_parser("t", "t")
    add_stack_arguments(parser)
    ns, extras = parser.parse_known_args(["--config", "x.yaml", "--local_rank=1", "--num_gpus", "8",
                                          "--num_nodes", "2", "--batch_size", "4"])
    stack = stack_from(ns, extras)
    assert stack.world.size == 16 and stack.overrides == ("--batch_size", "4")


def test_launcher_world_size_comes_from_the_environment():
    assert WorldSize.detect({"WORLD_SIZE": "4"}, num_gpus=2).size == 4
    assert WorldSize.detect({}, num_gpus=2).size == 2
    assert WorldSize.detect({}).size == 1


def test_lowering_the_learning_rate_below_a_configured_lr_end_says_how_to_fix_it(base):
    with pytest.raises(ConfigError) as err:
        load_config(ConfigFiles(base), ["--learning_rate", "5e-7"], world=ONE)
    assert "lr_end" in str(err.value) and "at most 5e-07" in str(err.value)
