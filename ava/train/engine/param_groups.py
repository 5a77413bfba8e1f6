"""Which parameters get weight decay: the optimizer's parameter groups.

Decoupled weight decay pulls every decayed weight toward zero.  That is a
prior on the projections (the matrices), not on the parameters that set a
scale or an offset: a norm's gain decayed toward 0 shrinks its whole layer's
output, and a bias has no reason to be small.  So, as nanoGPT, Hugging Face's
Trainer and Megatron do, decay applies to matrices, and `training.weight_decay_exclude`
names what is left out:

- `norms`: the weights of normalisation layers, and every other 1-D
  parameter (the gains and gates of the enhanced features): parameters that
  scale rather than project;
- `biases`: every parameter whose name ends in `bias` (MoA's per-expert
  biases are 2-D but still offsets);
- `embeddings`: the token and position embedding tables (and so a tied
  output head, which is the same tensor).  Off by default: nanoGPT and
  Megatron decay embeddings, and a large vocabulary's rarely-seen rows are
  what decay keeps in check.

The default, `[norms, biases]`, is what those three do.  An empty list decays
every parameter (Ava before this setting existed).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from torch import nn

EXCLUDABLE = ("norms", "biases", "embeddings")


@dataclass(frozen=True)
class DecaySplit:
    """Trainable parameter names with and without decay, for the groups and for saying what was decided."""

    decayed: tuple[str, ...]
    exempt: tuple[str, ...]


def _kind(name: str, parameter: nn.Parameter, owner: nn.Module) -> str:
    if name.endswith("bias"):
        return "biases"
    if isinstance(owner, nn.Embedding):
        return "embeddings"
    if isinstance(owner, (nn.LayerNorm, nn.RMSNorm)) or parameter.ndim < 2:
        return "norms"
    return "matrices"


def split_for_decay(model: nn.Module, exclude: Iterable[str]) -> DecaySplit:
    """Name every trainable parameter of `model` as decayed or exempt, in `named_parameters` order."""
    excluded = set(exclude)
    unknown = excluded - set(EXCLUDABLE)
    if unknown:
        raise ValueError(f"unknown weight_decay_exclude entries {sorted(unknown)}; known: {EXCLUDABLE}")
    owners = {id(p): m for m in model.modules() for p in m.parameters(recurse=False)}
    decayed: list[str] = []
    exempt: list[str] = []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        kind = _kind(name, parameter, owners[id(parameter)])
        (exempt if kind in excluded else decayed).append(name)
    return DecaySplit(tuple(decayed), tuple(exempt))


def decay_groups(model: nn.Module, weight_decay: float, exclude: Iterable[str]) -> list[dict[str, Any]]:
    """The optimizer's parameter groups: `decay` (at `weight_decay`) and, when anything is exempt, `no_decay` (0).

    Groups carry a `name`, which DeepSpeed's MoE splitting keys on.  One group
    when nothing is exempt, so an empty `exclude` builds exactly the optimizer
    Ava built before groups existed (and resumes its checkpoints).
    """
    split = split_for_decay(model, exclude)
    parameters = dict(model.named_parameters())
    groups: list[dict[str, Any]] = [{"name": "decay", "params": [parameters[n] for n in split.decayed],
                                     "weight_decay": weight_decay}]
    if split.exempt:
        groups.append({"name": "no_decay", "params": [parameters[n] for n in split.exempt], "weight_decay": 0.0})
    return [g for g in groups if g["params"]]


def describe(model: nn.Module, weight_decay: float, exclude: Iterable[str]) -> str:
    """One line for the run's notes: how many parameters are decayed and what is exempt."""
    split = split_for_decay(model, exclude)
    parameters = dict(model.named_parameters())
    count = sum(parameters[n].numel() for n in split.decayed)
    exempt = sum(parameters[n].numel() for n in split.exempt)
    left_out = ", ".join(sorted(set(exclude))) or "nothing"
    return (f"weight decay {weight_decay:g} on {len(split.decayed)} tensors ({count:,} parameters); "
            f"{len(split.exempt)} tensors ({exempt:,} parameters) exempt (training.weight_decay_exclude: {left_out})")
