"""Episodic kNN memory attention, the memory layer of Memorizing Transformers.

Wu et al. 2022, "Memorizing Transformers". One designated layer attends, as
usual, to the keys of a local window, and in addition looks up the top-k most
similar (key, value) pairs in a memory of earlier tokens; a learned per-head
gate mixes the two results. The other layers stay plain `CausalSelfAttention`.

What differs from the paper, and why:

- The memory is the earlier *segments of the same sequence*, searched exactly
  (dot products against every entry, then `torch.topk`) inside the forward,
  not an approximate index carried across training steps. The sequence is cut
  into segments of `segment_length` positions; local attention stays inside a
  query's own segment, so the memory is what lets the layer see beyond its
  window, up to `memory_size` tokens back.
- The memory holds one document: a query retrieves only entries with its own
  document id, so it is cleared at every document boundary and the first
  segment of a document is plain local attention.
- Memory keys and values are detached, as in the paper: gradients reach the
  projections through the local path and the memory query only, so the memory
  acts as a record of past activations rather than a second, unbounded
  attention path for backpropagation.
- Memory keys and queries are the un-rotated projections: rotary embeddings
  make a score depend on the distance between tokens, while a memory lookup
  should match content wherever it occurred (the paper's memory is also
  position-free). Rotary applies to the local attention only.

KV cache: the layer's slot of the `KVCache` holds *un-rotated* keys (it is
this layer's own slot, read by nothing else), because un-rotated keys cannot
be recovered from rotated ones without the rotation tables of every past
position. The local keys are rotated when read, so with a cache the layer
needs the cos/sin tables of positions 0 .. past + seq - 1, every position the
cache holds after this call: `rope` when it covers them, else the layer asks
the model's rotary embedding for them (`AttentionInputs.rotary`); the model
passes every kind the tables of the new positions only. Storing the raw keys
makes cached decoding compute exactly what the full forward does, in any
precision.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ava.model.attention_interface import AttentionInputs, AttentionLayer, Rope
from ava.model.kv_cache import KVCache
from ava.model.rotary import apply_rotary


class EpisodicMemoryAttention(AttentionLayer):
    """Replaces the self-attention of ONE designated transformer layer.

    Parameters: `q_proj`, `k_proj`, `v_proj`, `o_proj` as in `CausalSelfAttention`
    (grouped-query: query head h reads kv head h // (num_heads // num_kv_heads)),
    and `memory_gate` (num_heads,): head h outputs
    sigmoid(g_h) * memory_h + (1 - sigmoid(g_h)) * local_h. The gate starts at 0
    (an even mix), and `reset_parameters` puts it back there.
    """

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, bias: bool, dropout: float,
                 segment_length: int, memory_size: int, top_k: int) -> None:
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads = {num_heads} must be a multiple of num_kv_heads = {num_kv_heads}")
        if segment_length < 1 or memory_size < 1 or top_k < 1:
            raise ValueError(f"segment_length = {segment_length}, memory_size = {memory_size} and top_k = {top_k} "
                             "must each be at least 1")
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim = hidden_size // num_heads
        self.dropout = dropout
        self.segment_length, self.memory_size, self.top_k = segment_length, memory_size, top_k
        self.q_proj = nn.Linear(hidden_size, num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(num_heads * self.head_dim, hidden_size, bias=bias)
        self.memory_gate = nn.Parameter(torch.zeros(num_heads))

    @torch.no_grad()
    def reset_parameters(self, std: float, residual_std: float) -> None:
        """An even mix of memory and local attention."""
        nn.init.zeros_(self.memory_gate)

    def forward(self, x: torch.Tensor, rope: Rope | None, cache: KVCache | None = None, layer: int = 0,
                mask: torch.Tensor | None = None, inputs: AttentionInputs | None = None) -> tuple[torch.Tensor, None]:
        """Local attention within each segment, gated with a top-k lookup in the earlier segments; no stats.

        `mask` (batch, 1, seq, seq), True where a query may attend a key, further limits
        the local attention (packed documents); `inputs.documents` (batch, seq) integer ids
        (equal id = same document) limit both paths to a query's own document; None =
        the row is one document. Neither can be combined with `cache`; with a cache, the
        layer reads the rotary tables of positions 0 .. past + seq - 1 (see the module docstring).
        """
        batch, seq, _ = x.shape
        past = cache.length if cache is not None else 0
        total = past + seq
        documents = inputs.documents if inputs is not None else None
        rope = self._rope_from_start(rope, total, inputs, x.device)
        if cache is not None and (mask is not None or documents is not None):
            raise ValueError("packed documents (mask / documents) cannot be combined with a KV cache")
        q = self.q_proj(x).view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # un-rotated keys: the memory needs them position-free
        positions = torch.arange(past, total, device=x.device)
        segment = positions // self.segment_length
        local = self._local(q, k, v, rope, past, positions, segment, mask, documents)
        found = self._memory(q, k, v, past, positions, segment, documents)
        if found is not None:
            memory, any_entry = found
            # local + g * (memory - local): where a query found no entry the difference is exactly 0,
            # so there the layer is exactly local attention, whatever the gate.
            gate = torch.sigmoid(self.memory_gate).to(local.dtype).view(1, -1, 1, 1)
            local = local + gate * torch.where(any_entry, memory - local, torch.zeros_like(local))
        return self.o_proj(local.transpose(1, 2).reshape(batch, seq, self.num_heads * self.head_dim)), None

    @staticmethod
    def _rope_from_start(rope: Rope | None, total: int, inputs: AttentionInputs | None,
                         device: torch.device) -> Rope | None:
        """The tables of positions 0 .. total - 1: `rope` when it covers them (always without a cache), else
        computed with the model's rotary embedding, `inputs.rotary`."""
        if rope is None or rope[0].shape[-2] == total:
            return rope
        if inputs is not None and inputs.rotary is not None:
            return inputs.rotary(torch.arange(total, device=device), rope[0].dtype)
        raise ValueError(f"rope tables cover {rope[0].shape[-2]} positions; the episodic memory layer needs all "
                         f"{total} (0 .. cache length + seq - 1), since its cache holds un-rotated keys: pass them "
                         "as rope, or the model's rotary embedding as inputs.rotary")

    def _local(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope: Rope | None, past: int,
               positions: torch.Tensor, segment: torch.Tensor, mask: torch.Tensor | None,
               documents: torch.Tensor | None) -> torch.Tensor:
        """Causal attention to the keys of each query's own segment, with rotary positions."""
        total = past + q.shape[2]
        start = (past // self.segment_length) * self.segment_length  # no query reaches before its segment
        k, v = k[:, :, start:], v[:, :, start:]
        if rope is not None:
            cos, sin = rope
            q = apply_rotary(q, cos[..., past:, :], sin[..., past:, :])
            k = apply_rotary(k, cos[..., start:, :], sin[..., start:, :])
        key_positions = torch.arange(start, total, device=q.device)
        allowed = ((segment[:, None] == key_positions[None] // self.segment_length)
                   & (key_positions[None] <= positions[:, None]))[None, None]
        if mask is not None:
            allowed = allowed & mask
        if documents is not None:
            allowed = allowed & (documents[:, :, None] == documents[:, None, :])[:, None]
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=allowed, dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.num_kv_heads != self.num_heads)

    def _memory(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past: int, positions: torch.Tensor,
                segment: torch.Tensor, documents: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Exact top-k lookup among the detached, un-rotated keys of earlier segments of the same document.

        Returns the (batch, heads, seq, head_dim) memory read and a (batch, heads, seq, 1)
        flag, True where the query found at least one entry; None when no query can have one.
        """
        last = past + q.shape[2] - 1
        start = max(0, past - self.memory_size)
        end = (last // self.segment_length) * self.segment_length  # the last query's segment starts here
        if end <= start:
            return None
        # Detached: no gradient flows into the memory (the paper's memory is a non-differentiable store).
        keys, values = k[:, :, start:end].detach(), v[:, :, start:end].detach()
        key_positions = torch.arange(start, end, device=q.device)
        allowed = ((key_positions[None] // self.segment_length < segment[:, None])
                   & (positions[:, None] - key_positions[None] <= self.memory_size))[None, None]
        if documents is not None:
            allowed = allowed & (documents[:, :, None] == documents[:, None, start:end])[:, None]
        # Grouped-query: view the query heads as (kv_heads, group) so each group reads its kv head, no copies.
        batch, heads, seq, dim = q.shape
        group = heads // self.num_kv_heads
        grouped = q.view(batch, self.num_kv_heads, group, seq, dim)
        scores = (grouped @ keys[:, :, None].transpose(-1, -2)).view(batch, heads, seq, -1) / math.sqrt(dim)
        scores = scores.masked_fill(~allowed, float("-inf"))
        top, index = scores.topk(min(self.top_k, end - start), dim=-1)
        valid = allowed.expand(batch, heads, seq, -1).gather(-1, index)
        # A finite stand-in for masked entries keeps softmax free of NaN in rows with no valid entry;
        # those rows are zeroed here and replaced by the local output by the caller.
        wide = torch.promote_types(top.dtype, torch.float32)  # softmax in at least float32, as SDPA does
        logits = top.to(wide).masked_fill(~valid, torch.finfo(wide).min)
        probs = (logits.softmax(dim=-1) * valid).to(q.dtype)
        weights = torch.zeros_like(scores).scatter(-1, index, probs)
        read = (weights.view(batch, self.num_kv_heads, group, seq, -1) @ values[:, :, None]).view(batch, heads, seq, dim)
        return read, valid.any(dim=-1, keepdim=True)
