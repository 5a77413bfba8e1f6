"""Router losses: load balancing (Switch/GShard) and z-loss (ST-MoE)."""

from __future__ import annotations

import torch


def load_balancing_loss(probs: torch.Tensor, load: torch.Tensor, top_k: int) -> torch.Tensor:
    """E * sum_e f_e * P_e.

    f_e is the fraction of the T*k routing assignments that chose expert e and
    P_e the mean router probability of e over the T tokens. With this
    normalisation a perfectly even router scores exactly 1.0 whatever k is
    (Hugging Face's Mixtral loss is k times this). Only P carries gradient;
    f comes from the discrete top-k choice.
    """
    num_tokens, num_experts = probs.shape
    fraction = load.float() / max(num_tokens * top_k, 1)
    return num_experts * torch.sum(fraction * probs.mean(dim=0))


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of logsumexp(logits)^2: keeps router logits small and the softmax stable."""
    return torch.logsumexp(logits, dim=-1).square().mean()
