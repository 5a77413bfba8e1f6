"""Fold the guide's alternative key names into one canonical key.

The configuration guide names some settings twice: `deepspeed.micro_batch_size`
and `training.batch_size`, `deepspeed.precision` and `training.mixed_precision`,
the optimizer hyperparameters under `deepspeed.optimizer.params`, and
`dataloader_num_workers` in both `training` and `data`.  They are one setting.
The value from the highest-precedence layer wins, exactly as if the same key
had been overridden; two different values in the same layer are an error.
After validation `fill_aliases` writes the resolved value back under every
name, so a dumped config is self-consistent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ava.config.errors import Problem, format_value
from ava.config.merge import MergedTree
from ava.config.provenance import Origin
from ava.config.yaml_loader import KeyPath


@dataclass(frozen=True)
class AliasGroup:
    canonical: KeyPath
    aliases: tuple[KeyPath, ...]


ALIAS_GROUPS: tuple[AliasGroup, ...] = (
    AliasGroup(("training", "batch_size"), (("deepspeed", "micro_batch_size"), ("data", "train_batch_size"))),
    AliasGroup(("training", "gradient_accumulation_steps"), (("deepspeed", "gradient_accumulation_steps"),)),
    AliasGroup(("training", "learning_rate"), (("deepspeed", "optimizer", "params", "lr"),)),
    AliasGroup(("training", "weight_decay"), (("deepspeed", "optimizer", "params", "weight_decay"),)),
    AliasGroup(("training", "eps"), (("deepspeed", "optimizer", "params", "eps"),)),
    AliasGroup(("training", "mixed_precision"), (("deepspeed", "precision"),)),
    AliasGroup(("training", "dataloader_num_workers"), (("data", "dataloader_num_workers"),)),
)
BETAS: KeyPath = ("deepspeed", "optimizer", "params", "betas")
BETA_KEYS: tuple[KeyPath, KeyPath] = (("training", "beta1"), ("training", "beta2"))


def alias_of(path: KeyPath) -> KeyPath | None:
    """The canonical key an alias stands for, or None."""
    for group in ALIAS_GROUPS:
        if path in group.aliases:
            return group.canonical
    if path == BETAS:
        return ("training", "beta1")
    return None


def resolve_aliases(tree: MergedTree) -> list[Problem]:
    """Fold alias keys into their canonical key in place; return conflicts."""
    problems: list[Problem] = []
    for group in ALIAS_GROUPS:
        candidates = [(p, tree.get(p), tree.origins[p]) for p in (group.canonical, *group.aliases)
                      if tree.is_set(p)]
        _fold(tree, group.canonical, candidates, problems)
        for alias in group.aliases:
            _merge_history(tree, alias, group.canonical)
            tree.remove(alias)

    if tree.is_set(BETAS):
        betas, origin = tree.get(BETAS), tree.origins[BETAS]
        if isinstance(betas, list) and len(betas) == 2:
            for key, beta in zip(BETA_KEYS, betas, strict=True):
                candidates = [(BETAS, beta, origin)]
                if tree.is_set(key):
                    candidates.insert(0, (key, tree.get(key), tree.origins[key]))
                _fold(tree, key, candidates, problems)
                _merge_history(tree, BETAS, key)
            tree.remove(BETAS)
        # a malformed betas value stays in place for the schema to report
    return problems


def _fold(tree: MergedTree, canonical: KeyPath, candidates: list[tuple[KeyPath, Any, Origin]],
          problems: list[Problem]) -> None:
    if not candidates:
        return
    top = max(origin.layer for _, _, origin in candidates)
    winners = [c for c in candidates if c[2].layer == top]
    distinct = {repr(value) for _, value, _ in winners}
    if len(distinct) > 1:
        listed = "; ".join(f"{'.'.join(p)} = {format_value(v)} ({o.where()})" for p, v, o in winners)
        problems.append(Problem(
            winners[0][2].where(), ".".join(canonical),
            f"the same setting is given twice with different values in one layer: {listed}. "
            "These keys are alternative names for one value",
            "keep only one of them, or give them the same value"))
        return
    path, value, origin = winners[-1]
    if path != canonical:
        tree.origins.pop(canonical, None)
        parent = tree.get(canonical[:-1])
        if parent is None:
            node = tree.data
            for key in canonical[:-1]:
                node = node.setdefault(key, {})
            parent = node
        if not isinstance(parent, dict):
            return  # the section itself is malformed (a scalar); the schema reports it
        parent[canonical[-1]] = value
        tree.origins[canonical] = origin
        tree.locations[canonical] = origin


def _merge_history(tree: MergedTree, alias: KeyPath, canonical: KeyPath) -> None:
    moved = tree.history.get(alias, [])
    if moved:
        combined = tree.history.get(canonical, []) + moved
        tree.history[canonical] = sorted(combined, key=lambda a: a.origin.layer)


def fill_aliases(data: dict[str, Any], origins: dict[KeyPath, Origin]) -> None:
    """Write each canonical value under its alias names too (after validation)."""
    for group in ALIAS_GROUPS:
        value = _get(data, group.canonical)
        for alias in group.aliases:
            _set(data, alias, value)
            if group.canonical in origins:
                origins[alias] = origins[group.canonical]
    _set(data, BETAS, [_get(data, BETA_KEYS[0]), _get(data, BETA_KEYS[1])])
    if BETA_KEYS[0] in origins:
        origins[BETAS] = origins[BETA_KEYS[0]]


def _get(data: dict[str, Any], path: KeyPath) -> Any:
    node: Any = data
    for key in path:
        node = node[key]
    return node


def _set(data: dict[str, Any], path: KeyPath, value: Any) -> None:
    node = data
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = value
