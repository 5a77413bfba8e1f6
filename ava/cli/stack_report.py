"""What the CLI says about a resolved stack besides its values: presets that changed the model, and memory.

A hardware (or distributed, or RLHF) config that sets `model:` keys trains a
different model from the one the base config describes; `model_shape_notice`
names the file and every key it changed, with the values before and after.
`memory_verdict` holds the run's estimated memory per device to
`hardware.memory_gb` (`ava.model.memory_fit`).
"""

from __future__ import annotations

from typing import Any

from ava.config.errors import format_value
from ava.config.loader import ResolvedConfig
from ava.config.provenance import Layer
from ava.config.schema.model import ModelConfig
from ava.model.memory_estimate import parameter_counts
from ava.model.memory_fit import MemoryVerdict, check_run_memory

_PRESETS = (Layer.HARDWARE, Layer.DISTRIBUTED, Layer.RLHF)


def model_changes(resolved: ResolvedConfig) -> dict[str, list[tuple[str, Any, Any]]]:
    """Per preset file: the model keys it changed, as (key under model., value before it, its value)."""
    out: dict[str, list[tuple[str, Any, Any]]] = {}
    for path, origin in resolved.origins.items():
        if path[0] != "model" or origin.layer not in _PRESETS or origin.file is None:
            continue
        history = resolved.history.get(path, [])
        now = next((a.value for a in reversed(history) if a.origin.layer is origin.layer), None)
        before = next((a.value for a in reversed(history) if a.origin.layer < origin.layer), _default(path))
        if now != before:
            out.setdefault(origin.file, []).append((".".join(path[1:]), before, now))
    return out


def _default(path: tuple[str, ...]) -> Any:
    value: Any = ModelConfig()
    for key in path[1:]:
        value = getattr(value, key, None)
    return value


def model_shape_notice(resolved: ResolvedConfig, with_parameters: bool = False) -> list[str]:
    """One line per preset that changed the model: the file, the base config, each key before -> after.

    `with_parameters` adds the parameter count with and without the changes (builds the model on `meta`).
    """
    base = resolved.files.config or "the base config"
    lines = []
    for file, changes in model_changes(resolved).items():
        keys = ", ".join(f"{key} {format_value(before)} -> {format_value(after)}" for key, before, after in changes)
        line = f"model shape from {file}, over {base}: {keys}"
        if with_parameters:
            line += _parameters(resolved, changes, base)
        lines.append(line)
    return lines


def _parameters(resolved: ResolvedConfig, changes: list[tuple[str, Any, Any]], base: str) -> str:
    """' (N parameters; M with BASE's own shape)', or '' when the base's own shape is not a valid model."""
    data = resolved.to_dict()["model"]
    for key, before, _ in changes:
        *parents, leaf = key.split(".")
        node = data
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = before
    try:
        own = parameter_counts(ModelConfig.model_validate(data)).total
    except (ValueError, TypeError):  # the base's values may not combine with the preset's other keys
        return ""
    total = parameter_counts(resolved.config.model).total
    return f" ({_billions(total)} parameters; {_billions(own)} with {base}'s own shape)"


def _billions(n: int) -> str:
    return f"{n / 1e9:.3g}B" if n >= 1e8 else f"{n / 1e6:.3g}M"


def memory_verdict(resolved: ResolvedConfig, with_fixes: bool = True) -> MemoryVerdict:
    """The stack's estimated memory per device against hardware.memory_gb (at the stack's world size)."""
    cfg = resolved.config
    return check_run_memory(cfg.model, cfg.training, cfg.deepspeed, cfg.data.max_length, resolved.batch.world.size,
                            cfg.hardware.memory_gb, resolved.origin(("hardware", "memory_gb")).where(), with_fixes)
