"""The one call every attention kind answers, and what a forward gives them besides the tokens.

    output, stats = attention(x, rope, cache=None, layer=0, mask=None, inputs=None)

- `x` (batch, seq, hidden): the normed residual stream.
- `rope`: the cos/sin tables of x's positions (`RotaryEmbedding`), None
  without rotary embeddings.
- `cache`: the model's `KVCache`, `layer` the slot this layer owns; x's first
  position is `cache.length` (0 without a cache).
- `mask` (batch, 1, seq, seq), True where a query may attend a key: packed
  documents. None = causal.
- `inputs`: an `AttentionInputs`, built once per forward by the model: what
  only some kinds read.
- `output`: (batch, seq, hidden). `stats`: a routed kind's `MoEStats`,
  labelled by the kind itself (`kind` "moh", "moa"); None for the others.

Why one call: the block and the model call every kind the same way, so a new
kind is an entry in `ava.model.attention_kinds`, with no branch in the block
or the model. Why one dataclass for the optional inputs: each kind reads its
own fields (the memory its document ids, cross-attention its states), and a
new input becomes a field here instead of a parameter threaded through the
block, the model and every other kind. What a kind needs beyond its call it
asks for through these fields too: the episodic memory, which caches
un-rotated keys, builds the rotary tables of every cached position from
`inputs.rotary` (see `ava.model.episodic_memory`).

Two places use the call. A self-attention kind sits inside a block, which
adds its output to the residual stream. A gated cross-attention block
(Flamingo) is a residual block of its own (its norms, feed-forward and tanh
gates), so its output *is* the new stream; the model runs it before block i.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ava.model.kv_cache import KVCache
from ava.model.moe.metrics import MoEStats
from ava.model.rotary import RotaryEmbedding

Rope = tuple[torch.Tensor, torch.Tensor]
AttentionOutput = tuple[torch.Tensor, MoEStats | None]


@dataclass(frozen=True)
class AttentionInputs:
    """What one forward gives its attention layers besides x, rope, mask and cache; each reads its own fields.

    - `documents` (batch, seq) ids, equal id = same document: the episodic
      memory never reads across documents. None = one document per row.
    - `states`: the cross-attention context, embedded: (batch, C, width), or
      with `chunk` RETRO's neighbours (batch, n_chunks, K * length, width);
      `states_mask` True = valid, (batch, C) or (batch, n_chunks, K * length).
      None: the cross-attention blocks pass x through unchanged.
    - `chunk`: RETRO's chunk length; None for a plain context.
    - `rotary`: the model's rotary embedding, for a kind that needs the
      tables of other positions than x's.

    An object rather than a tuple, so that a compiled block is guarded only
    on the fields its attention reads: one forward with document ids and the
    next without recompile the memory layer's graph alone.
    """

    documents: torch.Tensor | None = None
    states: torch.Tensor | None = None
    states_mask: torch.Tensor | None = None
    chunk: int | None = None
    rotary: RotaryEmbedding | None = None


class AttentionLayer(nn.Module):
    """Base of Ava's attention kinds: the call above, and the initialisation only the kind knows."""

    def forward(self, x: torch.Tensor, rope: Rope | None, cache: KVCache | None = None, layer: int = 0,
                mask: torch.Tensor | None = None, inputs: AttentionInputs | None = None) -> AttentionOutput:
        raise NotImplementedError

    def reset_parameters(self, std: float, residual_std: float) -> None:
        """Initialise what `AvaForCausalLM.reset_parameters` does not (it covers nn.Linear, nn.Embedding and the
        norms): nothing by default. `residual_std` is for projections that write into the residual stream."""
