"""Layers merge in order base -> hardware -> distributed -> rlhf -> CLI, and every value knows its origin."""

from __future__ import annotations

from ava.config import ConfigFiles, WorldSize, load_config
from ava.config.merge import Leaf, merge
from ava.config.provenance import Layer, Origin

ONE = WorldSize(1, "test")


def _stack(write_yaml):
    base = write_yaml("base.yaml", """
        model:
          hidden_size: 64
          num_attention_heads: 4
        training:
          learning_rate: 0.001
          weight_decay: 0.1
          eps: 1e-8
          max_gradient_norm: 1.0
        """)
    hw = write_yaml("hw.yaml", """
        training:
          weight_decay: 0.2
          eps: 1e-7
          max_gradient_norm: 2.0
        """)
    dist = write_yaml("dist.yaml", """
        training:
          eps: 1e-6
          max_gradient_norm: 3.0
        """)
    return base, hw, dist


def test_cli_beats_distributed_beats_hardware_beats_base(write_yaml):
    base, hw, dist = _stack(write_yaml)
    r = load_config(ConfigFiles(base, hw, dist), ["--training.max_gradient_norm", "4.0"], world=ONE)
    t = r.config.training
    assert t.learning_rate == 0.001 and r.origin("training.learning_rate").file == base  # base only
    assert t.weight_decay == 0.2 and r.origin("training.weight_decay").file == hw  # hardware over base
    assert t.eps == 1e-6 and r.origin("training.eps").file == dist  # distributed over hardware
    assert t.max_gradient_norm == 4.0 and r.origin("training.max_gradient_norm").layer is Layer.CLI


def test_origins_carry_file_and_line(write_yaml):
    base, hw, dist = _stack(write_yaml)
    r = load_config(ConfigFiles(base, hw, dist), world=ONE)
    assert r.origin("model.hidden_size").where() == f"{base}:2"
    assert r.origin("training.weight_decay").where() == f"{hw}:2"
    assert r.origin("model.num_layers").where() == "default"


def test_history_lists_every_layer_that_set_a_key(write_yaml):
    base, hw, dist = _stack(write_yaml)
    r = load_config(ConfigFiles(base, hw, dist), ["--training.max_gradient_norm", "4.0"], world=ONE)
    chain = [(a.origin.layer, a.value) for a in r.history[("training", "max_gradient_norm")]]
    assert chain == [(Layer.BASE, 1.0), (Layer.HARDWARE, 2.0), (Layer.DISTRIBUTED, 3.0), (Layer.CLI, 4.0)]


def test_mappings_deep_merge_keeping_siblings(write_yaml):
    base = write_yaml("b.yaml", "training:\n  gradient_health:\n    enabled: true\n    initial_clip_value: 3.0\n")
    hw = write_yaml("h.yaml", "training:\n  gradient_health:\n    enabled: false\n")
    gh = load_config(ConfigFiles(base, hw), world=ONE).config.training.gradient_health
    assert gh.enabled is False and gh.initial_clip_value == 3.0


def test_explicit_null_resets_to_the_default(write_yaml):
    base = write_yaml("b.yaml", "training:\n  max_gradient_norm: 9.0\n  early_stopping_patience: 7\n")
    hw = write_yaml("h.yaml", "training:\n  max_gradient_norm: null\n")
    r = load_config(ConfigFiles(base, hw), ["--training.early_stopping_patience", "null"], world=ONE)
    assert r.config.training.max_gradient_norm == 0.5  # schema default
    assert r.origin("training.max_gradient_norm").layer is Layer.DEFAULT
    assert r.config.training.early_stopping_patience == 3
    assert r.history[("training", "max_gradient_norm")][-1].reset


def test_lists_replace_rather_than_merge():
    a = Origin(Layer.BASE, "a.yaml", 1)
    b = Origin(Layer.HARDWARE, "b.yaml", 1)
    tree = merge([[Leaf(("x", "items"), [1, 2, 3], a)], [Leaf(("x", "items"), [9], b)]])
    assert tree.data == {"x": {"items": [9]}} and tree.origins[("x", "items")] == b


def test_a_mapping_replaces_a_scalar_and_forgets_its_origin():
    a = Origin(Layer.BASE, "a.yaml", 1)
    b = Origin(Layer.CLI)
    tree = merge([[Leaf(("x",), 5, a)], [Leaf(("x", "y"), 1, b)]])
    assert tree.data == {"x": {"y": 1}} and ("x",) not in tree.origins


def test_distributed_alias_overrides_base_canonical_key(write_yaml):
    base = write_yaml("b.yaml", "training:\n  batch_size: 8\n  mixed_precision: fp32\n")
    dist = write_yaml("d.yaml", "deepspeed:\n  micro_batch_size: 4\n  precision: bf16\n")
    r = load_config(ConfigFiles(base, None, dist), world=ONE)
    assert r.config.training.batch_size == 4 and r.config.deepspeed.micro_batch_size == 4
    assert r.config.training.mixed_precision == "bf16" and r.config.deepspeed.precision == "bf16"
    assert r.origin("training.batch_size").key == "deepspeed.micro_batch_size"


def test_rlhf_layer_sits_between_distributed_and_cli(write_yaml):
    base = write_yaml("b.yaml", "training:\n  eps: 1e-8\n")
    dist = write_yaml("d.yaml", "training:\n  eps: 1e-7\n")
    rl = write_yaml("r.yaml", "rlhf:\n  stages: [grpo]\ntraining:\n  eps: 1e-6\n")
    r = load_config(ConfigFiles(base, None, dist, rl), world=ONE)
    assert r.config.training.eps == 1e-6 and r.config.rlhf is not None and r.config.rlhf.stages == ["grpo"]
    r2 = load_config(ConfigFiles(base, None, dist, rl), ["--training.eps", "1e-5"], world=ONE)
    assert r2.config.training.eps == 1e-5


def test_an_alias_alone_in_a_file_is_honoured_not_dropped(write_yaml):
    only_alias = write_yaml("d.yaml", "deepspeed:\n  micro_batch_size: 4\n  optimizer:\n    params:\n      lr: 5e-5\n")
    r = load_config(ConfigFiles(only_alias), ["--training.lr_end", "1e-6", "--training.warmup_steps", "10"],
                    world=ONE)
    assert r.config.training.batch_size == 4 and r.config.training.learning_rate == 5e-5
