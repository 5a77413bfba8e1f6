"""The dense feed-forward network: SwiGLU or GELU."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def activate(h: torch.Tensor, activation: str) -> torch.Tensor:
    """The non-gated FFN nonlinearity (gelu or gelu_tanh)."""
    if activation == "gelu_tanh":
        return F.gelu(h, approximate="tanh")
    return F.gelu(h)


class DenseMLP(nn.Module):
    """The monolith FFN, and the shared expert of an MoE layer.

    SwiGLU keeps gate and up as separate matrices. Fusing them into one GEMM
    was measured slower on CPU: autograd must then concatenate the two halves
    of the gradient, an extra pass over a (tokens, 2 x width) tensor.
    """

    def __init__(self, hidden_size: int, intermediate_size: int, activation: str, bias: bool) -> None:
        super().__init__()
        self.activation = activation
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias) if activation == "swiglu" else None
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_proj is not None:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(activate(self.up_proj(x), self.activation))
