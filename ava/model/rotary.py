"""Rotary position embeddings in the Llama/Mixtral layout.

The "rotate half" layout (first and second half of each head paired, not
interleaved neighbours) is what Hugging Face Llama and Mixtral weights were
trained with, so q/k projections import without permutation.
"""

from __future__ import annotations

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    """cos/sin of the rotation angles for the positions asked for (computed per call from `inv_freq`)."""

    def __init__(self, head_dim: int, max_positions: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.head_dim, self.max_positions, self.theta = head_dim, max_positions, theta
        # Not persistent: derived from config, so checkpoints stay free of it and it never goes stale.
        self.inv_freq: torch.Tensor
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of shape (seq, head_dim) for integer `positions` of shape (seq,).

        Positions of shape (batch, seq) -- each packed document counting from 0 --
        give tables of shape (batch, seq, head_dim).
        """
        freqs = positions.to(torch.float32)[..., None] * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (batch, heads, seq, head_dim) `x` by the angles in cos/sin, (seq, head_dim) or (batch, seq, head_dim)."""
    if cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
