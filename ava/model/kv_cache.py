"""A preallocated key/value cache for incremental decoding.

Buffers are allocated once for the whole generation, so each new token is a
slice write, not a concatenation that copies the entire history every step.
"""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values of every layer, (batch, kv_heads, max_length, head_dim) each."""

    def __init__(self, num_layers: int, batch: int, kv_heads: int, max_length: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        shape = (batch, kv_heads, max_length, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.max_length = max_length
        self.length = 0  # positions filled in every layer

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new keys/values of `layer` after the cached ones; return the whole history."""
        start, end = self.length, self.length + k.shape[2]
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self, steps: int) -> None:
        """Mark `steps` more positions as filled, once every layer has written them."""
        self.length += steps
