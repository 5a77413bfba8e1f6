"""Making the MoE layers safe under DeepSpeed ZeRO-3, and marking expert parameters.

Under ZeRO-3 each parameter is gathered by a hook when its module runs. In an
MoE layer, which experts run depends on the data, so ranks would gather
different parameters and the collective calls would no longer match: a hang
or a crash. Marking the whole MoE layer a ZeRO-3 *leaf* makes DeepSpeed gather
all its parameters at once on entry, on every rank, whatever the routing.
Ava's experts are one stacked tensor per projection, so this is one gather
per projection, not one per expert.

Kept out of the model definition (which stays free of DeepSpeed), and
imported by the engine only when ZeRO-3 is configured.
"""

from __future__ import annotations

from torch import nn

from ava.model.moe import MoELayer


def mark_moe_zero3_leaves(model: nn.Module) -> int:
    """Register every MoELayer as a ZeRO-3 leaf module; returns how many were marked.

    Call before `deepspeed.initialize`. A dense model has nothing to mark.
    """
    from deepspeed.utils import set_z3_leaf_modules

    if not any(isinstance(m, MoELayer) for m in model.modules()):
        return 0
    return len(set_z3_leaf_modules(model, [MoELayer]))


def expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The stacked expert weights: what expert parallelism shards along dim 0 and must not all-reduce."""
    return [p for m in model.modules() if isinstance(m, MoELayer) for p in m.experts.parameters()]
