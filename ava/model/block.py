"""One pre-norm transformer block: attention, then a dense or MoE feed-forward.

The attention is whichever kind the config names for the layer
(`ModelConfig.attention_kind`), built from `ava.model.attention_kinds` and
called the one way every kind is (`ava.model.attention_interface`): the block
knows no kind.
"""

from __future__ import annotations

import torch
from torch import nn

from ava.config.schema.model import ModelConfig
from ava.model.attention_interface import AttentionInputs, Rope
from ava.model.attention_kinds import make_attention
from ava.model.kv_cache import KVCache
from ava.model.mlp import DenseMLP
from ava.model.moe import MoELayer, MoEStats
from ava.model.norm import make_norm


class TransformerBlock(nn.Module):
    """x + attn(norm(x)), then h + ffn(norm(h)); the FFN is an MoELayer when the config has experts."""

    def __init__(self, cfg: ModelConfig, index: int = 0) -> None:
        super().__init__()
        self.attn_norm = make_norm(cfg.norm_type, cfg.hidden_size, cfg.layer_norm_eps, cfg.use_bias)
        self.attn_kind = cfg.attention_kind(index)  # the kind's name, for reading a model; nothing branches on it
        self.attn = make_attention(self.attn_kind, cfg, index)
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

    def forward(self, x: torch.Tensor, rope: Rope | None, cache: KVCache | None = None, layer: int = 0,
                mask: torch.Tensor | None = None, inputs: AttentionInputs | None = None
                ) -> tuple[torch.Tensor, MoEStats | None, MoEStats | None]:
        """The new residual stream, the MoE FFN's statistics and a routed attention's (None where not routed).

        The arguments are the attention's (`ava.model.attention_interface`).
        """
        a, attn_stats = self.attn(self.attn_norm(x), rope, cache, layer, mask, inputs)
        h = x + self.dropout(a)
        stats = None
        if isinstance(self.ffn, MoELayer):
            f, stats = self.ffn(self.ffn_norm(h))
        else:
            f = self.ffn(self.ffn_norm(h))
        return h + self.dropout(f), stats, attn_stats
