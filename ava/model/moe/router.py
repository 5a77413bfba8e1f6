"""Token-choice routers: which experts each token goes to, and with what weight.

Router arithmetic runs in float32 whatever the model's dtype: top-k choices
made from bf16 logits flip between near-tied experts from step to step, and
the z-loss squares a logsumexp that bf16 cannot hold precisely (ST-MoE, §3).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Routing:
    """The routing decision for T tokens over E experts, k choices each."""

    expert_ids: torch.Tensor  # (T, k) int64, choice j of token t
    weights: torch.Tensor     # (T, k) float32 (or float64), the gate value that scales each choice's output
    probs: torch.Tensor       # (T, E) float32, the distribution the aux loss and entropy are taken over
    logits: torch.Tensor      # (T, E) float32, raw router outputs (for the z-loss)


class Router(nn.Module):
    """`topk`, `switch` or `aux_loss_free` routing over `num_experts` experts.

    - topk (Mixtral): softmax over all experts, take the top k, renormalise
      the k weights to sum to 1.
    - switch (Switch Transformer): top-1, weighted by its softmax probability
      (not renormalised, or the router would receive no gradient).
    - aux_loss_free (DeepSeek-V3): sigmoid affinities; a per-expert bias,
      outside the gradient, shifts *which* experts are chosen towards the
      under-loaded ones, while the weights come from the unbiased affinities.
      `update_bias` moves the bias after each optimizer step.
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, kind: str) -> None:
        super().__init__()
        if kind not in ("topk", "switch", "aux_loss_free"):
            raise ValueError(f"unknown router_type {kind!r}")
        self.num_experts, self.top_k, self.kind = num_experts, 1 if kind == "switch" else top_k, kind
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)
        if kind == "aux_loss_free":
            # Persistent: the bias is learned state that a resumed run must continue from.
            self.expert_bias: torch.Tensor
            self.register_buffer("expert_bias", torch.zeros(num_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> Routing:
        dtype = torch.promote_types(x.dtype, torch.float32)  # at least fp32; float64 stays float64
        logits = F.linear(x.to(dtype), self.gate.weight.to(dtype))
        if self.kind == "aux_loss_free":
            scores = torch.sigmoid(logits)
            ids = torch.topk(scores + self.expert_bias, self.top_k, dim=-1).indices
            weights = scores.gather(-1, ids)
            weights = weights / weights.sum(dim=-1, keepdim=True)
            probs = scores / scores.sum(dim=-1, keepdim=True)
            return Routing(ids, weights, probs, logits)
        probs = torch.softmax(logits, dim=-1)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        if self.kind == "topk":
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return Routing(ids, weights, probs, logits)

    @torch.no_grad()
    def update_bias(self, load: torch.Tensor, rate: float) -> None:
        """Move each expert's bias by `rate` towards even load, given the assignment counts `load`.

        The trainer sums `MoEStats.load` over the micro-batches of a step (and,
        under data parallelism, over ranks, so every rank applies the same
        update) and calls this after the optimizer step. Nothing is recorded
        in forward, so activation-checkpoint recomputation cannot count twice.
        """
        if self.kind == "aux_loss_free":
            load = load.float()
            self.expert_bias += rate * torch.sign(load.mean() - load)
