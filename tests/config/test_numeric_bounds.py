"""Every number in the schema has an upper bound, and validation names the accepted range.

The walk covers every int and float of every section, nested sections, the
items of a list of sections (data.sources) and the values of a list of
numbers (deepspeed.optimizer.params.betas): a key added without a bound
fails here, before a user finds that `hidden_size: 1e23` passes validation
and crashes inside torch.
"""

from __future__ import annotations

import math
import types
import typing
from typing import Any, Union

import pytest
from pydantic import BaseModel, Field, ValidationError

from ava.config import ConfigError, ConfigFiles, WorldSize, load_config, validate
from ava.config.merge import MergedTree
from ava.config.schema import SECTIONS
from ava.config.schema.base import INT64_MAX, Section

ONE = WorldSize(1, "test")


def _members(annotation: Any) -> list[Any]:
    """The types a field's annotation allows: `int | None` -> [int, NoneType]; Annotated unwrapped."""
    if typing.get_origin(annotation) in (Union, types.UnionType):
        return [m for arg in typing.get_args(annotation) for m in _members(arg)]
    if typing.get_origin(annotation) is typing.Annotated:
        return _members(typing.get_args(annotation)[0])
    return [annotation]


def _list_item(annotation: Any) -> tuple[Any, list[Any]]:
    """A list's item type and the constraints written on it (list[Annotated[float, Field(lt=1)]])."""
    item = typing.get_args(annotation)[0]
    if typing.get_origin(item) is typing.Annotated:
        base, *extra = typing.get_args(item)
        return base, [m for e in extra for m in getattr(e, "metadata", [e])]
    return item, []


def numeric_keys(model: type[BaseModel], prefix: tuple[Any, ...] = ()) -> list[tuple[tuple[Any, ...], type, list[Any]]]:
    """(path, int or float, constraints) of every number under `model`; an int in a path is a list index."""
    found = []
    for name, info in model.model_fields.items():
        for member in _members(info.annotation):
            if member in (int, float):
                found.append(((*prefix, name), member, list(info.metadata)))
            elif isinstance(member, type) and issubclass(member, BaseModel):
                found += numeric_keys(member, (*prefix, name))
            elif typing.get_origin(member) is list:
                item, constraints = _list_item(member)
                if isinstance(item, type) and issubclass(item, BaseModel):
                    found += numeric_keys(item, (*prefix, name, 0))
                elif item in (int, float):
                    found.append(((*prefix, name, 0), item, constraints))
    return found


KEYS = [((section, *path), kind, constraints)
        for section, model in SECTIONS.items() for path, kind, constraints in numeric_keys(model)]
IDS = [".".join(str(p) for p in path) for path, _, _ in KEYS]


def _yaml(path: tuple[Any, ...], value: str) -> str:
    """A config setting `path` to `value` (a list index becomes a list; its other values are valid)."""
    lines, indent = [], ""
    for depth, part in enumerate(path):
        last = depth == len(path) - 1
        nxt = path[depth + 1] if not last else None
        if isinstance(nxt, int):
            if depth + 2 == len(path):  # a list of numbers: every value is the one under test
                lines.append(f"{indent}{part}: [{value}, {value}]")
                break
            lines.append(f"{indent}{part}:")
            lines.append(f"{indent}  - path: data.txt")  # the one required key of a data source
            indent += "    "
            continue
        if isinstance(part, int):
            continue
        lines.append(f"{indent}{part}:" + (f" {value}" if last else ""))
        indent += "  "
    return "\n".join(lines) + "\n"


def _problems(write_yaml: Any, text: str) -> str:
    path = write_yaml("c.yaml", text)
    with pytest.raises(ConfigError) as err:
        load_config(ConfigFiles(path), world=ONE)
    return str(err.value)


def test_the_walk_finds_every_kind_of_numeric_key():
    paths = {".".join(str(p) for p in path) for path, _, _ in KEYS}
    assert {"model.hidden_size", "training.max_steps", "training.gradient_health.warmup_steps",
            "data.sources.0.weight", "deepspeed.optimizer.params.betas.0", "deepspeed.allgather_bucket_size",
            "hardware.memory_gb", "rlhf.ppo.kl_coef", "rlhf.lora.alpha", "training.lora.rank"} <= paths
    assert len(KEYS) > 150


@pytest.mark.parametrize("path, kind, constraints", KEYS, ids=IDS)
def test_every_numeric_key_has_an_upper_bound(path, kind, constraints):
    highs = [getattr(c, name) for c in constraints for name in ("le", "lt") if getattr(c, name, None) is not None]
    assert highs, f"{'.'.join(map(str, path))} has no upper bound: give it le= (see ava.config.schema.base)"
    assert all(math.isfinite(h) for h in highs)
    if kind is int:
        assert max(highs) <= INT64_MAX


@pytest.mark.parametrize("path, kind, constraints", KEYS, ids=IDS)
def test_every_numeric_key_refuses_a_huge_value_naming_its_range(write_yaml, path, kind, constraints):
    # 2^62 fits int64, so only the key's own bound refuses it; 1e300 is a finite float.
    huge = str(2**62) if kind is int else "1e300"
    message = _problems(write_yaml, _yaml(path, huge))
    name = next(p for p in reversed(path) if isinstance(p, str))
    assert name in message and ("must be at most" in message or "must be less than" in message), message
    assert "Fix: choose a value " in message and "Fix: choose a value in range" not in message, message
    assert " to " in message or "at most" in message or "less than" in message, message


FLOAT_KEYS = [(path, constraints) for path, kind, constraints in KEYS if kind is float]


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
@pytest.mark.parametrize("path, constraints", FLOAT_KEYS, ids=[".".join(map(str, p)) for p, _ in FLOAT_KEYS])
def test_every_float_key_refuses_nan_and_infinity(write_yaml, path, constraints, value):
    message = _problems(write_yaml, _yaml(path, value))
    assert f"must be a finite number, not {value}" in message, message
    assert "Fix: choose a value " in message, message


class _Unbounded(Section):
    """A section whose author forgot the upper bound."""

    count: int = Field(0, ge=0)
    offset: int = 0


def test_an_integer_key_without_a_bound_still_refuses_values_beyond_int64(monkeypatch):
    assert _Unbounded(count=INT64_MAX, offset=-INT64_MAX - 1).count == INT64_MAX
    for beyond in ({"count": INT64_MAX + 1}, {"offset": -INT64_MAX - 2}, {"count": 10**30}):
        with pytest.raises(ValidationError) as err:
            _Unbounded(**beyond)
        assert err.value.errors()[0]["type"] == "int64_range"
    # ... and says so like every other range problem.
    monkeypatch.setitem(validate.SECTIONS, "probe", _Unbounded)
    _, problems, _ = validate.validate_sections(MergedTree(data={"probe": {"count": 10**30}}))
    assert [p.render() for p in problems] == [
        f"defaults: probe.count = {10**30}: is beyond the 64-bit integers every count and size must fit in. "
        "Fix: choose a value at most 2^63 - 1."]


@pytest.mark.parametrize("text, fragment", [
    # whole numbers: "greater than 0" reads "from 1"
    ("training:\n  max_steps: 0\n", "Fix: choose a value from 1 to 2^53 (9,007,199,254,740,992): Optimizer steps"),
    ("model:\n  num_layers: 100000\n", "must be at most 16,384. Fix: choose a value from 1 to 16,384"),
    ("training:\n  learning_rate: 0\n", "Fix: choose a value greater than 0 and at most 1: Peak learning rate"),
    ("training:\n  beta2: 1\n", "must be less than 1. Fix: choose a value at least 0 and less than 1: AdamW beta2"),
    ("data:\n  max_train_examples: -2\n", "must be at least -1. Fix: choose a value from -1 to 2^53"),
    ("data:\n  shuffle_seed: 4294967296\n", "Fix: choose a value from 0 to 2^32 - 1 (4,294,967,295)"),
    ("model:\n  rope_theta: 1e13\n", "must be at most 1e12. Fix: choose a value greater than 0 and at most 1e12"),
    ("training:\n  gradient_health:\n    explosion_threshold: 1\n", "choose a value greater than 1 and at most 1e6"),
    ("training:\n  learning_rate: nan\n", "nan is not a valid number here"),
    ("model:\n  num_experts: Infinity\n", "Infinity is not a valid number here"),
])
def test_range_fixes_name_the_range(write_yaml, text, fragment):
    assert fragment in _problems(write_yaml, text)


def test_values_at_the_bounds_are_valid(write_yaml):
    path = write_yaml("c.yaml", "model:\n  num_layers: 16384\n  num_experts: 0\ntraining:\n  max_steps: 9007199254740992\n"
                      "  learning_rate: 1.0\n  lr_end: 0.0\ndata:\n  shuffle_seed: 4294967295\n")
    config = load_config(ConfigFiles(path), world=ONE).config
    assert (config.model.num_layers, config.training.max_steps, config.data.shuffle_seed) == (16384, 2**53, 2**32 - 1)
