"""One batch solver: global = micro x accumulation x data-parallel ranks, always consistent."""

from __future__ import annotations

import pytest

from ava.config import ConfigError, ConfigFiles, WorldSize, load_config
from ava.config.batch import BatchValue, nearest_combinations, solve_batch
from ava.config.provenance import Layer, Origin


def _load(write_yaml, base_text, dist_text=None, overrides=(), world=1):
    base = write_yaml("base.yaml", base_text)
    dist = write_yaml("dist.yaml", dist_text) if dist_text else None
    return load_config(ConfigFiles(base, None, dist), list(overrides), WorldSize(world, "test"))


def test_global_batch_follows_micro_accumulation_and_world(write_yaml):
    r = _load(write_yaml, "training:\n  batch_size: 8\n  gradient_accumulation_steps: 4\n", world=2)
    assert (r.batch.micro, r.batch.accumulation, r.batch.global_batch) == (8, 4, 64)
    assert r.config.deepspeed.train_batch_size == 64


@pytest.mark.parametrize("world, accumulation", [(1, 8), (2, 4), (4, 2), (8, 1)])
def test_a_fixed_global_batch_is_kept_across_gpu_counts_by_adjusting_accumulation(write_yaml, world, accumulation):
    r = _load(write_yaml, "training:\n  batch_size: 4\n  gradient_accumulation_steps: 16\n",
              "deepspeed:\n  train_batch_size: 32\n", world=world)
    assert (r.batch.micro, r.batch.accumulation, r.batch.global_batch) == (4, accumulation, 32)
    note = [n for n in r.notices if n.key == "training.gradient_accumulation_steps"]
    assert note and "was 16" in note[0].message  # the user is told
    assert r.origin("training.gradient_accumulation_steps").layer is Layer.DERIVED


def test_inconsistent_batch_settings_are_one_error_naming_every_source(write_yaml):
    base = write_yaml("base.yaml", "training:\n  batch_size: 8\n  gradient_accumulation_steps: 4\n"
                                   "deepspeed:\n  train_batch_size: 100\n")
    with pytest.raises(ConfigError) as err:
        load_config(ConfigFiles(base), world=WorldSize(1, "test"))
    problems = err.value.problems
    assert len(problems) == 1
    text = problems[0].render()
    for source in ("deepspeed.train_batch_size = 100", f"{base}:5", "training.batch_size = 8", f"{base}:2",
                   "training.gradient_accumulation_steps = 4", f"{base}:3", "nearest valid"):
        assert source in text


def test_global_batch_not_divisible_by_the_world_size_is_an_error(write_yaml):
    with pytest.raises(ConfigError) as err:
        _load(write_yaml, "training:\n  batch_size: 8\n", "deepspeed:\n  train_batch_size: 32\n", world=3)
    assert "3 data-parallel rank(s)" in str(err.value)


def test_cli_micro_and_accumulation_recompute_a_lower_layer_global(write_yaml):
    r = _load(write_yaml, "training:\n  batch_size: 8\n", "deepspeed:\n  train_batch_size: 64\n",
              ["--batch_size", "2", "--gradient_accumulation_steps", "3"], world=2)
    assert (r.batch.micro, r.batch.accumulation, r.batch.global_batch) == (2, 3, 12)


def test_deepspeed_json_always_carries_all_three_consistent_values(write_yaml):
    from ava.config import build_deepspeed_config

    r = _load(write_yaml, "training:\n  batch_size: 4\n", "deepspeed:\n  train_batch_size: 48\n", world=3)
    ds = build_deepspeed_config(r.config)
    assert ds["train_batch_size"] == ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * 3


def test_nearest_combinations_are_all_valid():
    for m, a, g, w in [(8, 4, 100, 1), (6, 5, 64, 2), (3, 1, 7, 1), (16, 2, 1000, 8)]:
        combos = nearest_combinations(m, a, g, w)
        assert combos
        for text in combos:
            mm, aa, gg = (int(x) for x in
                          text.replace("micro ", "").replace(" x accumulation ", ",").split(" x ")[0].split(",")
                          + [text.rsplit(" ", 1)[1]])
            assert mm * aa * w == gg


def test_all_three_from_one_layer_disagreeing_is_never_silently_fixed():
    o = Origin(Layer.BASE, "b.yaml", 1)
    plan, problems = solve_batch(BatchValue("m", 8, o), BatchValue("a", 4, o), BatchValue("g", 64, o),
                                 WorldSize(1, "t"))
    assert plan is None and len(problems) == 1


def test_huge_inconsistent_values_are_answered_quickly_not_by_scanning_every_divisor():
    o = Origin(Layer.BASE, "b.yaml", 1)
    # a linear divisor scan over 10**12 would never finish; the suggestions stay near the request
    plan, problems = solve_batch(BatchValue("m", 8, o), BatchValue("a", 4, o), BatchValue("g", 10**12 + 1, o),
                                 WorldSize(1, "t"))
    assert plan is None and "nearest valid" in problems[0].render()


def test_a_micro_batch_a_file_sets_is_never_raised_to_meet_a_global_batch(write_yaml):
    """tiny.yaml's micro 8 x accumulation 1 and a distributed file's global 1001 (odd, so no accumulation fits):
    once the micro batch became 1001, a 125x larger batch per device, with only a note."""
    with pytest.raises(ConfigError) as err:
        _load(write_yaml, "training:\n  batch_size: 8\n  gradient_accumulation_steps: 1\n",
              "deepspeed:\n  train_batch_size: 1001\n")
    text = str(err.value)
    assert "nearest valid combinations" in text and "micro 1001" not in text
    assert "micro 7 x accumulation 143 x 1 rank(s) = global 1001" in text  # keeps the global batch, micro <= 8


def test_an_unset_micro_batch_may_still_follow_the_global_batch(write_yaml):
    r = _load(write_yaml, "training:\n  gradient_accumulation_steps: 2\n", "deepspeed:\n  train_batch_size: 12\n",
              world=2)
    assert (r.batch.micro, r.batch.accumulation, r.batch.global_batch) == (3, 2, 12)
