"""The MoE feed-forward block: route, group by expert, run experts, combine."""

from __future__ import annotations

import torch
from torch import nn

from ava.model.compile import run_outside_graph
from ava.model.mlp import DenseMLP
from ava.model.moe.dispatch import combine_rows, expert_capacity, gather_rows, plan_dispatch
from ava.model.moe.expert_parallel import ExpertParallel, run_experts_across_ranks
from ava.model.moe.experts import GroupedExperts
from ava.model.moe.losses import load_balancing_loss, router_z_loss
from ava.model.moe.metrics import MoEStats
from ava.model.moe.router import Router


class MoELayer(nn.Module):
    """Token-choice Mixture of Experts, dropless or with a capacity factor, plus an optional shared expert.

    A token whose assignments are all dropped gets zero from this block and so
    passes through the block's residual connection unchanged. After
    `distribute_experts` the layer holds only its rank's share of the experts
    and runs the others on the ranks that hold them (`expert_parallel`).
    """

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int,
                 router_type: str, activation: str, capacity_factor: float | None,
                 aux_loss_coef: float, z_loss_coef: float, shared_intermediate_size: int = 0,
                 bias: bool = False) -> None:
        super().__init__()
        self.router = Router(hidden_size, num_experts, top_k, router_type)
        self.experts = GroupedExperts(num_experts, hidden_size, intermediate_size, activation)
        self.shared_expert = (DenseMLP(hidden_size, shared_intermediate_size, activation, bias)
                              if shared_intermediate_size else None)
        self.num_experts, self.top_k = num_experts, self.router.top_k
        self.capacity_factor = capacity_factor
        self.aux_loss_coef, self.z_loss_coef = aux_loss_coef, z_loss_coef
        self.expert_parallel: ExpertParallel | None = None

    def distribute_experts(self, ep: ExpertParallel) -> None:
        """Keep only the experts `ep` assigns this rank; forwards then exchange rows with the group.

        Routing stays over all `num_experts`, so a layer built whole, with
        the same weights, computes the same function after this call.
        """
        if self.expert_parallel is not None:
            raise RuntimeError("this MoE layer's experts are already distributed")
        self.experts.keep_experts(*ep.owned(self.num_experts))
        self.expert_parallel = ep

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, MoEStats]:
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        routing = self.router(tokens)
        capacity = expert_capacity(tokens.shape[0], self.top_k, self.num_experts, self.capacity_factor)
        plan = plan_dispatch(routing.expert_ids, routing.weights, self.num_experts, capacity)
        rows = gather_rows(tokens, plan)
        if self.expert_parallel is None:
            rows = self.experts(rows, plan.counts)
        else:
            # Eagerly even inside a compiled block: the all-to-all splits are host ints.
            rows = run_outside_graph(run_experts_across_ranks, self.experts, rows, plan.counts,
                                     self.expert_parallel)
        out = combine_rows(rows, plan)
        if self.shared_expert is not None:
            out = out + self.shared_expert(tokens)
        return out.view(shape), self._stats(routing.probs, routing.logits, plan.counts, plan.kept)

    def _stats(self, probs: torch.Tensor, logits: torch.Tensor, load: torch.Tensor,
               kept: torch.Tensor) -> MoEStats:
        aux = load_balancing_loss(probs, load, self.top_k)
        z = router_z_loss(logits)
        with torch.no_grad():
            total = load.sum().clamp_min(1)
            dropped = (total - kept.sum()).float() / total
            entropy = -(probs * probs.clamp_min(1e-20).log()).sum(-1).mean()
        return MoEStats(router_loss=self.aux_loss_coef * aux + self.z_loss_coef * z,
                        aux_loss=aux.detach(), z_loss=z.detach(), load=load.detach(),
                        dropped_fraction=dropped, entropy=entropy)
