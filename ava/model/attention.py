"""Causal self-attention with grouped-query heads, through PyTorch's SDPA kernel: the "standard" attention kind.

Its call is the one every kind answers (`ava.model.attention_interface`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ava.model.attention_interface import AttentionInputs, AttentionLayer, AttentionOutput, Rope
from ava.model.kv_cache import KVCache
from ava.model.rotary import apply_rotary


def mask_after_cache(mask: torch.Tensor | None, past: int, seq: int,
                     device: torch.device) -> tuple[torch.Tensor | None, bool]:
    """The SDPA (attn_mask, is_causal) for `seq` queries after `past` cached positions.

    No cache: `mask` if given (packed documents), else SDPA's own causal mask.
    After a prefix, one query sees everything cached; a chunk's query i sees
    every cached key and the chunk's keys up to itself.
    """
    if not past:
        return mask, mask is None
    if seq > 1:
        return torch.ones(seq, past + seq, dtype=torch.bool, device=device).tril(diagonal=past), False
    return mask, False


class CausalSelfAttention(AttentionLayer):
    """Multi-head or grouped-query attention.

    q, k and v are separate projections named as in Llama. A fused qkv matmul
    measured no faster in a training step on CPU (its backward must concatenate
    the three gradients, which eats what the larger GEMM saves), and separate
    weights map one-to-one onto Hugging Face checkpoints.
    """

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, bias: bool, dropout: float) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim = hidden_size // num_heads
        self.dropout = dropout
        self.q_proj = nn.Linear(hidden_size, num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(num_heads * self.head_dim, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor, rope: Rope | None, cache: KVCache | None = None, layer: int = 0,
                mask: torch.Tensor | None = None, inputs: AttentionInputs | None = None) -> AttentionOutput:
        """The attention output and no stats. `mask` (batch, 1, seq, seq), True where a query may attend a
        key, replaces the causal mask (packed documents: causal within each document only)."""
        y = self.heads(x, rope, cache, layer, mask)
        return self.o_proj(y.flatten(2)), None

    def heads(self, x: torch.Tensor, rope: Rope | None, cache: KVCache | None = None, layer: int = 0,
              mask: torch.Tensor | None = None) -> torch.Tensor:
        """Every head's output before the output projection, (batch, seq, heads, head_dim).

        Separate from `forward` so Mixture-of-Head attention can weight the heads.
        """
        batch, seq, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        past = 0
        if cache is not None:
            past = cache.length
            k, v = cache.update(layer, k, v)
        mask, causal = mask_after_cache(mask, past, seq, x.device)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.num_kv_heads != self.num_heads)
        return y.transpose(1, 2)
