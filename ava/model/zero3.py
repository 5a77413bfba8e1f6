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

from ava.model.moa import MixtureOfAttention
from ava.model.moe import MoELayer
from ava.model.moh import HeadRouter


def mark_moe_zero3_leaves(model: nn.Module) -> int:
    """Register every routed module as a ZeRO-3 leaf module; returns how many were marked.

    The routed modules: MoE layers, MoA layers (attention experts, for the same
    reason as MoE experts) and MoH's head routers, which read their gates'
    weights directly, to multiply in float32, instead of calling the gate
    modules, so no hook of the gates would gather them.
    Call before `deepspeed.initialize`. A model without routing has nothing to mark.
    """
    from deepspeed.utils import set_z3_leaf_module

    leaves = [m for m in model.modules() if isinstance(m, (MoELayer, MixtureOfAttention, HeadRouter))]
    for module in leaves:
        set_z3_leaf_module(module, True)
    return len(leaves)


def expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The stacked expert weights: what expert parallelism shards along dim 0 and must not all-reduce."""
    return [p for m in model.modules() if isinstance(m, MoELayer) for p in m.experts.parameters()]
