"""aux_loss_free routing's bias update (DeepSeek-V3): after each applied step, from the step's expert loads.

The loads of every micro batch that trained are summed, then summed over the
data-parallel ranks (one collective), so every rank moves its biases the same
way: they are buffers, which DeepSpeed never synchronises. Loads are taken
from the forwards' outputs, not recorded inside the model, so activation
checkpointing's recomputation cannot count a batch twice.
"""

from __future__ import annotations

import torch
from torch import nn

from ava.model.moe import MoELayer, MoEStats


def uses_bias_balancing(model: nn.Module) -> bool:
    return any(isinstance(m, MoELayer) and m.router.kind == "aux_loss_free" for m in model.modules())


def add_loads(total: list[torch.Tensor], stats: list[MoEStats]) -> list[torch.Tensor]:
    """`total` plus one forward's per-layer expert loads (detached)."""
    loads = [s.load.detach().float() for s in stats]
    return loads if not total else [a + b for a, b in zip(total, loads, strict=True)]


def balance_router_biases(model: nn.Module, loads: list[torch.Tensor], rate: float) -> None:
    """Move every MoE layer's expert bias by `rate` towards even load, from `loads` summed over all ranks."""
    if not loads:
        return
    total = torch.stack(loads)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(total)
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    with torch.no_grad():
        for layer, load in zip(layers, total.unbind(), strict=True):
            layer.router.update_bias(load, rate)
