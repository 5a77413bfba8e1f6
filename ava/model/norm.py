"""Normalisation layers: torch's own RMSNorm and LayerNorm, chosen by config."""

from __future__ import annotations

from torch import nn


def make_norm(kind: str, size: int, eps: float, bias: bool) -> nn.Module:
    """RMSNorm (Llama, Mixtral) or LayerNorm (GPT-2, with a bias when `bias`)."""
    if kind == "rmsnorm":
        return nn.RMSNorm(size, eps=eps)
    if kind == "layernorm":
        return nn.LayerNorm(size, eps=eps, bias=bias)
    raise ValueError(f"unknown norm_type {kind!r}")
