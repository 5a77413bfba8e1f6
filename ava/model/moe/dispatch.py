"""Grouping routed tokens by expert, and putting expert outputs back.

Assignments are flattened choice-major (index p = j*T + t: every token's first
choice, then every second choice), then stably sorted by expert. That order
is both the layout the grouped matmul needs (each expert's rows contiguous)
and the capacity priority of GShard/Switch: first choices before second
choices, earlier tokens before later ones.

Dropped assignments are kept in place with weight 0 rather than removed, so
every shape is known without reading counts back to the host: the step never
waits on the GPU. The cost is computing the (few) dropped rows.

Both movements are gathers in forward *and* backward (custom autograd
functions below), never a scatter-add: gathers are deterministic on GPU and
cheaper than index_add on CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class DispatchPlan:
    """Where each of the N = T*k routed rows comes from and goes to."""

    order: torch.Tensor    # (N,) choice-major assignment index of each expert-sorted row
    inverse: torch.Tensor  # (N,) position in sorted order of each choice-major assignment
    counts: torch.Tensor   # (E,) rows per expert in sorted order (= load, dropped rows included)
    weights: torch.Tensor  # (N,) gate weight of each sorted row, 0 where dropped
    kept: torch.Tensor     # (E,) assignments each expert actually processes
    num_tokens: int
    top_k: int


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, factor: float | None) -> int | None:
    """Rows one expert may take: ceil(factor * T * k / E); None means dropless."""
    if not factor:
        return None
    return max(1, math.ceil(factor * num_tokens * top_k / num_experts))


def plan_dispatch(expert_ids: torch.Tensor, weights: torch.Tensor, num_experts: int,
                  capacity: int | None) -> DispatchPlan:
    """Sort T*k assignments by expert; zero the weight of those past an expert's capacity."""
    num_tokens, top_k = expert_ids.shape
    flat = expert_ids.t().reshape(-1)
    sorted_experts, order = torch.sort(flat, stable=True)
    # A scatter rather than bincount: bincount's output length depends on the data, which breaks the
    # compiled graph (see ava.model.compile); integer sums are exact in any order.
    counts = torch.zeros(num_experts, dtype=flat.dtype, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    sorted_weights = weights.t().reshape(-1)[order]
    if capacity is None:
        kept = counts
    else:
        starts = torch.cumsum(counts, 0) - counts
        rank_in_expert = torch.arange(order.numel(), device=order.device) - starts[sorted_experts]
        sorted_weights = sorted_weights * (rank_in_expert < capacity)
        kept = counts.clamp(max=capacity)
    return DispatchPlan(order, inverse, counts, sorted_weights, kept, num_tokens, top_k)


class _GatherTokens(torch.autograd.Function):
    """rows[i] = x[order[i] % T]; the gradient sums each token's k rows, found through `inverse`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor, top_k: int) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        ctx.top_k, ctx.shape = top_k, x.shape
        return x.index_select(0, order % x.shape[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        rows = grad.index_select(0, inverse).view(ctx.top_k, *ctx.shape)
        return rows.sum(0), None, None, None


class _Combine(torch.autograd.Function):
    """out[t] = sum_j w[j, t] * rows[inverse[j*T + t]]: un-sort, weight and sum in one function.

    Written out so that the weighted (N, H) copy autograd would keep is never
    made: forward is one gather plus k fused multiply-adds over (T, H), backward
    one gather the other way plus k multiplies; the gradient of the k weights is
    a row-wise dot product.
    """

    @staticmethod
    def forward(ctx, rows: torch.Tensor, weights: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor,
                top_k: int) -> torch.Tensor:
        per_choice = rows.index_select(0, inverse).view(top_k, -1, rows.shape[-1])
        w = weights.to(rows.dtype).index_select(0, inverse).view(top_k, -1, 1)
        out = per_choice[0] * w[0]
        for j in range(1, top_k):
            out.addcmul_(per_choice[j], w[j])
        ctx.save_for_backward(per_choice, w, order)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        per_choice, w, order = ctx.saved_tensors
        grad_per_choice = grad.unsqueeze(0) * w
        grad_rows = grad_per_choice.view(-1, grad.shape[-1]).index_select(0, order)
        grad_w = torch.einsum("kth,th->kt", per_choice, grad).reshape(-1).index_select(0, order)
        return grad_rows, grad_w, None, None, None


def gather_rows(x: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """(T, H) tokens → (N, H) rows grouped by expert."""
    return _GatherTokens.apply(x, plan.order, plan.inverse, plan.top_k)


def combine_rows(rows: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """(N, H) expert outputs → (T, H): each token's k outputs weighted by their gates and summed."""
    return _Combine.apply(rows, plan.weights, plan.order, plan.inverse, plan.top_k)
