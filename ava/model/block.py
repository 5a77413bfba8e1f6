"""One pre-norm transformer block: attention, then a dense or MoE feed-forward.

Which attention a layer gets is the config's `attention_kind`: standard,
Mixture-of-Head (MoH), Mixture of Attention heads (MoA), or the episodic-memory
layer.
"""

from __future__ import annotations

import torch
from torch import nn

from ava.config.schema.model import ModelConfig
from ava.model.attention import CausalSelfAttention
from ava.model.episodic_memory import EpisodicMemoryAttention
from ava.model.kv_cache import KVCache
from ava.model.mlp import DenseMLP
from ava.model.moa import MixtureOfAttention
from ava.model.moe import MoELayer, MoEStats
from ava.model.moh import MixtureOfHeadsAttention
from ava.model.norm import make_norm


def make_attention(cfg: ModelConfig, index: int) -> nn.Module:
    """The attention `cfg.attention_kind(index)` names."""
    kind = cfg.attention_kind(index)
    if kind == "moh":
        return MixtureOfHeadsAttention(cfg.hidden_size, cfg.num_attention_heads, cfg.kv_heads, cfg.use_bias,
                                       cfg.attention_dropout, cfg.moh_shared_heads, cfg.moh_active_routed_heads,
                                       cfg.moh.aux_loss_coef, cfg.moh.z_loss_coef)
    if kind == "moa":
        return MixtureOfAttention(cfg.hidden_size, cfg.moa.num_experts, cfg.moa.experts_per_token,
                                  cfg.moa_heads_per_expert, cfg.kv_heads, cfg.head_dim, cfg.use_bias,
                                  cfg.attention_dropout, cfg.moa.aux_loss_coef, cfg.moa.z_loss_coef)
    if kind == "memory":
        m = cfg.episodic_memory
        return EpisodicMemoryAttention(cfg.hidden_size, cfg.num_attention_heads, cfg.kv_heads, cfg.use_bias,
                                       cfg.attention_dropout, m.segment_length, m.memory_size, m.top_k)
    return CausalSelfAttention(cfg.hidden_size, cfg.num_attention_heads, cfg.kv_heads, cfg.use_bias,
                               cfg.attention_dropout)


class TransformerBlock(nn.Module):
    """x + attn(norm(x)), then h + ffn(norm(h)); the FFN is an MoELayer when the config has experts."""

    def __init__(self, cfg: ModelConfig, index: int = 0) -> None:
        super().__init__()
        self.attn_norm = make_norm(cfg.norm_type, cfg.hidden_size, cfg.layer_norm_eps, cfg.use_bias)
        self.attn = make_attention(cfg, index)
        self.attn_kind = cfg.attention_kind(index)
        self.ffn_norm = make_norm(cfg.norm_type, cfg.hidden_size, cfg.layer_norm_eps, cfg.use_bias)
        self.ffn: nn.Module
        if cfg.is_moe:
            self.ffn = MoELayer(cfg.hidden_size, cfg.intermediate_size, cfg.num_experts, cfg.num_experts_per_token,
                                cfg.router_type, cfg.activation, cfg.expert_capacity_factor,
                                cfg.router_aux_loss_coef, cfg.router_z_loss_coef,
                                cfg.shared_expert_intermediate_size, cfg.use_bias)
        else:
            self.ffn = DenseMLP(cfg.hidden_size, cfg.intermediate_size, cfg.activation, cfg.use_bias)
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                cache: KVCache | None = None, layer: int = 0, mask: torch.Tensor | None = None,
                documents: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, MoEStats | None, MoEStats | None]:
        """The new residual stream, the MoE FFN's statistics and a routed attention's (None where not routed).

        `documents` (batch, seq) document ids: where the episodic memory is cleared.
        """
        a, attn_stats = self._attend(self.attn_norm(x), rope, cache, layer, mask, documents)
        h = x + self.dropout(a)
        stats = None
        if isinstance(self.ffn, MoELayer):
            f, stats = self.ffn(self.ffn_norm(h))
        else:
            f = self.ffn(self.ffn_norm(h))
        return h + self.dropout(f), stats, attn_stats

    def _attend(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, cache: KVCache | None,
                layer: int, mask: torch.Tensor | None,
                documents: torch.Tensor | None) -> tuple[torch.Tensor, MoEStats | None]:
        if isinstance(self.attn, MixtureOfHeadsAttention):
            return self.attn.forward_with_stats(x, rope, cache, layer, mask)
        if self.attn_kind == "moa":
            y, stats = self.attn(x, rope, cache, layer, mask)
            stats.kind = "moa"
            return y, stats
        if self.attn_kind == "memory":
            return self.attn(x, rope, cache, layer, mask, documents), None
        return self.attn(x, rope, cache, layer, mask), None
