"""Attention kinds by name: the one table the model builds its attention layers from.

A block's attention is the entry its config names (`ModelConfig.attention_kind`:
"standard", "moh", "moa" or "memory"); the gated cross-attention blocks the
model places before blocks `ModelConfig.cross_attention_layers` are the
"cross" entry. Each entry takes the model config and the layer's index and
builds a module that answers the call of `ava.model.attention_interface`, so
adding a kind is an entry here (and a config that names it): the block and the
model do not change.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ava.config.schema.model import ModelConfig
from ava.model.attention import CausalSelfAttention
from ava.model.cross_attention import GatedCrossAttention
from ava.model.episodic_memory import EpisodicMemoryAttention
from ava.model.moa import MixtureOfAttention
from ava.model.moh import MixtureOfHeadsAttention

AttentionBuilder = Callable[[ModelConfig, int], nn.Module]


def _standard(cfg: ModelConfig, index: int) -> nn.Module:
    return CausalSelfAttention(cfg.hidden_size, cfg.num_attention_heads, cfg.kv_heads, cfg.use_bias,
                               cfg.attention_dropout)


def _moh(cfg: ModelConfig, index: int) -> nn.Module:
    return MixtureOfHeadsAttention(cfg.hidden_size, cfg.num_attention_heads, cfg.kv_heads, cfg.use_bias,
                                   cfg.attention_dropout, cfg.moh_shared_heads, cfg.moh_active_routed_heads,
                                   cfg.moh.aux_loss_coef, cfg.moh.z_loss_coef)


def _moa(cfg: ModelConfig, index: int) -> nn.Module:
    return MixtureOfAttention(cfg.hidden_size, cfg.moa.num_experts, cfg.moa.experts_per_token,
                              cfg.moa_heads_per_expert, cfg.kv_heads, cfg.head_dim, cfg.use_bias,
                              cfg.attention_dropout, cfg.moa.aux_loss_coef, cfg.moa.z_loss_coef)


def _memory(cfg: ModelConfig, index: int) -> nn.Module:
    m = cfg.episodic_memory
    return EpisodicMemoryAttention(cfg.hidden_size, cfg.num_attention_heads, cfg.kv_heads, cfg.use_bias,
                                   cfg.attention_dropout, m.segment_length, m.memory_size, m.top_k)


def _cross(cfg: ModelConfig, index: int) -> nn.Module:
    c = cfg.cross_attention
    return GatedCrossAttention(cfg.hidden_size, c.context_size or cfg.hidden_size,
                               c.num_heads or cfg.num_attention_heads, cfg.intermediate_size,
                               cfg.activation, cfg.norm_type, cfg.layer_norm_eps, cfg.use_bias)


ATTENTION_KINDS: dict[str, AttentionBuilder] = {
    "standard": _standard,
    "moh": _moh,
    "moa": _moa,
    "memory": _memory,
    "cross": _cross,
}


def make_attention(kind: str, cfg: ModelConfig, index: int) -> nn.Module:
    """The attention layer `index` of the model `cfg` describes, of the kind named `kind`."""
    build = ATTENTION_KINDS.get(kind)
    if build is None:
        raise ValueError(f"no attention kind {kind!r} (layer {index}); the kinds are {', '.join(ATTENTION_KINDS)}: "
                         "register a new one in ava.model.attention_kinds.ATTENTION_KINDS")
    return build(cfg, index)
