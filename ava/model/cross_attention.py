"""Gated cross-attention blocks (Flamingo; Alayrac et al. 2022) and RETRO's chunked variant.

A block reads an external context: encoder states, or text retrieved for the
batch. It is inserted *between* the language model's own blocks and adds
tanh(gate) * cross_attention and tanh(gate) * feed-forward to the residual
stream. It answers the call of every attention kind
(`ava.model.attention_interface`): the context comes as
`AttentionInputs.states`, and since the block is a residual block of its own,
its output is the new residual stream; without a context it is x.

Both gates start at exactly 0, so a model that gains these blocks computes
what it computed without them until training opens the gates: a pretrained
model can be extended without disturbing it (the test pins the identity).

Two context layouts:

- plain: context (batch, C, width) with an optional (batch, C) validity mask;
  every token may read every valid context position (the context is given,
  not generated, so there is nothing causal about it);
- chunked (RETRO, Borgeaud et al. 2022): neighbours retrieved for each chunk of
  `chunk` tokens, (batch, n_chunks, K, width). A neighbour found with chunk u's
  text may only be read by tokens that have seen all of chunk u: positions
  from the last token of chunk u to the last-but-one of chunk u+1, which is
  RETRO's one-token offset. Earlier tokens get zero from the block.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ava.model.attention_interface import AttentionInputs, AttentionLayer, Rope
from ava.model.kv_cache import KVCache
from ava.model.mlp import DenseMLP
from ava.model.norm import make_norm


class GatedCrossAttention(AttentionLayer):
    """Flamingo's GATED XATTN-DENSE: x + tanh(a) * xattn(norm(x), ctx); then + tanh(f) * ffn(norm(.))."""

    def __init__(self, hidden_size: int, context_size: int, num_heads: int, intermediate_size: int,
                 activation: str, norm_type: str, eps: float, bias: bool) -> None:
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"cross-attention heads ({num_heads}) must divide hidden_size ({hidden_size})")
        self.num_heads, self.head_dim = num_heads, hidden_size // num_heads
        self.attn_norm = make_norm(norm_type, hidden_size, eps, bias)
        self.q_proj = nn.Linear(hidden_size, hidden_size, bias=bias)
        self.k_proj = nn.Linear(context_size, hidden_size, bias=bias)
        self.v_proj = nn.Linear(context_size, hidden_size, bias=bias)
        self.o_proj = nn.Linear(hidden_size, hidden_size, bias=bias)
        self.ffn_norm = make_norm(norm_type, hidden_size, eps, bias)
        self.ffn = DenseMLP(hidden_size, intermediate_size, activation, bias)
        # Parameters, not buffers: the gates are learned. Zero = the block is the identity.
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.ffn_gate = nn.Parameter(torch.zeros(1))

    @torch.no_grad()
    def reset_parameters(self, std: float, residual_std: float) -> None:
        """Closed gates: the block starts as the identity."""
        nn.init.zeros_(self.attn_gate)
        nn.init.zeros_(self.ffn_gate)

    def forward(self, x: torch.Tensor, rope: Rope | None, cache: KVCache | None = None, layer: int = 0,
                mask: torch.Tensor | None = None, inputs: AttentionInputs | None = None) -> tuple[torch.Tensor, None]:
        """The new residual stream after reading `inputs.states`, and no stats; x itself without states.

        The context has no positions of x's sequence, so `rope` and `mask` do not apply, and it is not
        cached: `cache` only says where x starts (its length) when decoding.
        """
        if inputs is None or inputs.states is None:
            return x, None
        start = cache.length if cache is not None else 0
        return self._read(x, inputs.states, inputs.states_mask, inputs.chunk, start), None

    def _read(self, x: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor | None,
              chunk: int | None, start: int) -> torch.Tensor:
        """`context` (batch, C, width), or with `chunk` (batch, n_chunks, K, width); masks: True = valid.

        `start`: the position of x's first token.
        """
        batch, seq, _ = x.shape
        if chunk is not None and start == 0 and seq == context.shape[1] * chunk:
            y = self._read_by_chunk(x, context, context_mask, chunk)
            x = x + torch.tanh(self.attn_gate).to(x.dtype) * self.o_proj(y)
            return x + torch.tanh(self.ffn_gate).to(x.dtype) * self.ffn(self.ffn_norm(x))
        q = self.q_proj(self.attn_norm(x)).view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)
        if chunk is not None:
            allowed, context = _chunked_mask(start, seq, chunk, context, context_mask)
        else:
            allowed = (context_mask if context_mask is not None
                       else torch.ones(context.shape[:2], dtype=torch.bool, device=x.device))[:, None, :]
            allowed = allowed.expand(batch, seq, -1)
        k = self.k_proj(context).view(batch, -1, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(context).view(batch, -1, self.num_heads, self.head_dim).transpose(1, 2)
        # A query with nothing to read would make a fully masked softmax (NaN): let it read position 0 and
        # zero its result instead.
        empty = ~allowed.any(-1, keepdim=True)
        allowed = allowed.clone()
        allowed[..., :1] |= empty
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None])
        y = y.transpose(1, 2).masked_fill(empty[..., None], 0.0).flatten(2)
        x = x + torch.tanh(self.attn_gate).to(x.dtype) * self.o_proj(y)
        return x + torch.tanh(self.ffn_gate).to(x.dtype) * self.ffn(self.ffn_norm(x))

    def _read_by_chunk(self, x: torch.Tensor, neighbours: torch.Tensor, valid: torch.Tensor | None,
                       chunk: int) -> torch.Tensor:
        """RETRO's chunked cross-attention for a whole training row: each window of `chunk` positions reads
        only its own chunk's neighbours, so the cost grows with seq x K x length, not seq x all neighbours.

        Window u is positions (u+1)*chunk - 1 ... (u+2)*chunk - 2 (the queries shifted left by chunk - 1,
        padded at the end); positions before chunk - 1 read nothing. Same result as the masked path.
        """
        batch, seq, hidden = x.shape
        n_chunks, per_chunk = neighbours.shape[1], neighbours.shape[2]
        h, d = self.num_heads, self.head_dim
        q = self.q_proj(self.attn_norm(x))
        # 4-D (batch * n_chunks, heads, positions, head_dim), the layout every SDPA kernel takes.
        q = F.pad(q[:, chunk - 1:], (0, 0, 0, chunk - 1)).reshape(batch * n_chunks, chunk, h, d).transpose(1, 2)
        k = self.k_proj(neighbours).reshape(batch * n_chunks, per_chunk, h, d).transpose(1, 2)
        v = self.v_proj(neighbours).reshape(batch * n_chunks, per_chunk, h, d).transpose(1, 2)
        mask = empty = None
        if valid is not None:
            allowed = valid.reshape(batch * n_chunks, 1, 1, per_chunk)
            empty = ~allowed.any(-1, keepdim=True)  # a chunk with no neighbour: read position 0, zero the result
            mask = allowed.clone()
            mask[..., :1] |= empty
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (batch * n, heads, chunk, head_dim)
        if empty is not None:
            y = y.masked_fill(empty, 0.0)
        y = y.transpose(1, 2).reshape(batch, seq, hidden)[:, :seq - chunk + 1]
        return F.pad(y, (0, 0, chunk - 1, 0))


def _chunked_mask(start: int, seq: int, chunk: int, neighbours: torch.Tensor,
                  valid: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Flatten (batch, n, K, width) neighbours to keys and say which position may read which key.

    Position p reads the neighbours of chunk (p + 1) // chunk - 1 (RETRO's
    offset: the last token of chunk u has seen all of it).
    """
    batch, n_chunks, per_chunk, _ = neighbours.shape
    device = neighbours.device
    reads = (torch.arange(start, start + seq, device=device) + 1) // chunk - 1  # (seq,), -1 = reads nothing
    key_chunk = torch.arange(n_chunks, device=device).repeat_interleave(per_chunk)  # (n*K,)
    allowed = reads[:, None] == key_chunk[None, :]  # (seq, n*K)
    allowed = allowed[None].expand(batch, -1, -1)
    if valid is not None:
        allowed = allowed & valid.reshape(batch, 1, n_chunks * per_chunk)
    return allowed, neighbours.reshape(batch, n_chunks * per_chunk, -1)
