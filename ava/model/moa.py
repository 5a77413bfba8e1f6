"""Mixture of Attention heads (MoA): each token picks k of E attention experts.

Zhang et al. 2022, "Mixture of Attention Heads: Selecting Attention Heads Per
Token". An expert is a group of `heads_per_expert` query heads with its own
query and output projection; the key and value projections are shared by all
experts, so keys and values are computed (and cached) once per token, exactly
as for `CausalSelfAttention`, and the model's KVCache holds them unchanged.
A token's output is the router-weighted sum of its k experts' outputs.

Only the chosen experts run: a token has k * heads_per_expert active query
heads (and as many rows through the query and output projections), whatever
E is, so E can grow the attention's parameters without growing its compute.

The per-expert projections are stacked (E, in, out) parameters, as in
`GroupedExperts`: the expert-sorted rows go through one grouped matmul, ZeRO-3
gathers one tensor per projection, and a checkpoint maps expert e to slice e.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ava.model.attention import mask_after_cache
from ava.model.attention_interface import AttentionInputs, AttentionLayer, Rope
from ava.model.compile import run_outside_graph
from ava.model.kv_cache import KVCache
from ava.model.moe.dispatch import DispatchPlan, combine_rows, gather_rows, plan_dispatch
from ava.model.moe.experts import grouped_mm_supported
from ava.model.moe.losses import load_balancing_loss, router_z_loss
from ava.model.moe.metrics import MoEStats
from ava.model.moe.router import Router
from ava.model.rotary import apply_rotary


class MixtureOfAttention(AttentionLayer):
    """Top-k routed attention experts over shared keys and values; a drop-in for `CausalSelfAttention`.

    Parameters: `router.gate`, shared `k_proj` and `v_proj` (nn.Linear, num_kv_heads
    heads), stacked `q_proj` (E, hidden, heads_per_expert*head_dim) and `o_proj`
    (E, heads_per_expert*head_dim, hidden), and with `bias` also `q_bias` and `o_bias`.
    Inside an expert, query head i reads kv head i // (heads_per_expert // num_kv_heads),
    the grouped-query layout of `CausalSelfAttention`.
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, heads_per_expert: int,
                 num_kv_heads: int, head_dim: int, bias: bool, dropout: float,
                 aux_loss_coef: float, z_loss_coef: float) -> None:
        super().__init__()
        if heads_per_expert % num_kv_heads:
            raise ValueError(f"MoA heads_per_expert = {heads_per_expert} must be a multiple of num_kv_heads = "
                             f"{num_kv_heads}: each expert's query heads share the kv heads in equal groups")
        self.router = Router(hidden_size, num_experts, top_k, "topk")
        self.num_experts, self.top_k = num_experts, self.router.top_k
        self.heads_per_expert, self.num_kv_heads, self.head_dim = heads_per_expert, num_kv_heads, head_dim
        self.dropout = dropout
        self.aux_loss_coef, self.z_loss_coef = aux_loss_coef, z_loss_coef
        width = heads_per_expert * head_dim
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias)
        self.q_proj = nn.Parameter(torch.empty(num_experts, hidden_size, width))
        self.o_proj = nn.Parameter(torch.empty(num_experts, width, hidden_size))
        self.q_bias = nn.Parameter(torch.empty(num_experts, width)) if bias else None
        self.o_bias = nn.Parameter(torch.empty(num_experts, hidden_size)) if bias else None
        self.reset_parameters(0.02, 0.02)

    @torch.no_grad()
    def reset_parameters(self, std: float, residual_std: float) -> None:
        """Initialise the stacked projections (the model's reset covers the nn.Linear ones): o_proj writes
        into the residual stream, so it takes the residual std."""
        nn.init.normal_(self.q_proj, 0.0, std)
        nn.init.normal_(self.o_proj, 0.0, residual_std)
        for b in (self.q_bias, self.o_bias):
            if b is not None:
                nn.init.zeros_(b)

    def active_fraction(self) -> float:
        """Share of the expert parameters one token uses."""
        return self.top_k / self.num_experts

    def forward(self, x: torch.Tensor, rope: Rope | None, cache: KVCache | None = None, layer: int = 0,
                mask: torch.Tensor | None = None, inputs: AttentionInputs | None = None) -> tuple[torch.Tensor, MoEStats]:
        """As `CausalSelfAttention.forward`, with the router's stats."""
        batch, seq, hidden = x.shape
        tokens = x.reshape(-1, hidden)
        routing = self.router(tokens)
        plan = plan_dispatch(routing.expert_ids, routing.weights, self.num_experts, None)
        expert_of_row = routing.expert_ids.t().reshape(-1).index_select(0, plan.order)

        q = _expert_matmul(gather_rows(tokens, plan), plan.counts, self.q_proj)
        if self.q_bias is not None:
            q = q + self.q_bias.index_select(0, expert_of_row)
        q = self._to_heads(_Permute.apply(q, plan.inverse, plan.order), batch, seq)
        k = self.k_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        past = 0
        if cache is not None:
            past = cache.length
            k, v = cache.update(layer, k, v)
        mask, causal = mask_after_cache(mask, past, seq, x.device)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=q.shape[1] != self.num_kv_heads)

        rows = _Permute.apply(self._from_heads(y), plan.order, plan.inverse)
        rows = _expert_matmul(rows, plan.counts, self.o_proj)
        if self.o_bias is not None:
            rows = rows + self.o_bias.index_select(0, expert_of_row)
        out = combine_rows(rows, plan)
        return out.view(batch, seq, hidden), self._stats(routing.probs, routing.logits, plan)

    def _to_heads(self, q: torch.Tensor, batch: int, seq: int) -> torch.Tensor:
        """Choice-major query rows (k*T, heads_per_expert*head_dim) → (batch, k*heads_per_expert, seq, head_dim).

        SDPA's grouped-query attention gives query head n kv head n // (query heads per kv head),
        so heads are ordered kv-head-major: n = c*(k*r) + j*r + m for kv head c, choice j and the
        expert's head i = c*r + m (r = heads_per_expert // num_kv_heads). Each expert head thus
        reads kv head i // r, as its own heads would in `CausalSelfAttention`.
        """
        g, r = self.num_kv_heads, self.heads_per_expert // self.num_kv_heads
        q = q.view(self.top_k, batch, seq, g, r, self.head_dim).permute(1, 3, 0, 4, 2, 5)
        return q.reshape(batch, g * self.top_k * r, seq, self.head_dim)

    def _from_heads(self, y: torch.Tensor) -> torch.Tensor:
        """Inverse of `_to_heads`: (batch, heads, seq, head_dim) → choice-major rows."""
        batch, _, seq, _ = y.shape
        g, r = self.num_kv_heads, self.heads_per_expert // self.num_kv_heads
        y = y.view(batch, g, self.top_k, r, seq, self.head_dim).permute(2, 0, 4, 1, 3, 5)
        return y.reshape(self.top_k * batch * seq, self.heads_per_expert * self.head_dim)

    def _stats(self, probs: torch.Tensor, logits: torch.Tensor, plan: DispatchPlan) -> MoEStats:
        """The stats `MoELayer` reports, labelled "moa"; MoA is dropless, so nothing is ever dropped."""
        aux = load_balancing_loss(probs, plan.counts, self.top_k)
        z = router_z_loss(logits)
        with torch.no_grad():
            entropy = -(probs * probs.clamp_min(1e-20).log()).sum(-1).mean()
        return MoEStats(router_loss=self.aux_loss_coef * aux + self.z_loss_coef * z,
                        aux_loss=aux.detach(), z_loss=z.detach(), load=plan.counts.detach(),
                        dropped_fraction=torch.zeros((), device=probs.device), entropy=entropy, kind="moa")


class _Permute(torch.autograd.Function):
    """rows[i] = x[perm[i]] for a permutation `perm` whose inverse is `inv`.

    The gradient is the gather by `inv`, not the index_add autograd would use
    for index_select: deterministic on GPU, as in `ava.model.moe.dispatch`.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, perm: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inv)
        return x.index_select(0, perm)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inv,) = ctx.saved_tensors
        return grad.index_select(0, inv), None, None


def _expert_matmul(rows: torch.Tensor, counts: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """rows[offset_e : offset_e + counts[e]] @ weight[e] for every expert e (rows sorted by expert).

    One grouped GEMM without a host sync where torch has one for the dtype and
    widths; otherwise (float64, odd widths) one matmul per expert. Compilation
    is handled as in `GroupedExperts.forward`.
    """
    grouped = rows.dtype == weight.dtype and grouped_mm_supported(rows.dtype, tuple(weight.shape[1:]))
    if grouped and (rows.dtype == torch.bfloat16 or not torch.compiler.is_compiling()):
        return _grouped_matmul(rows, counts, weight)
    return run_outside_graph(_eager_matmul, rows, counts, weight, grouped)


def _grouped_matmul(rows: torch.Tensor, counts: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.grouped_mm(rows, weight, offs=torch.cumsum(counts, 0).to(torch.int32))


def _eager_matmul(rows: torch.Tensor, counts: torch.Tensor, weight: torch.Tensor, grouped: bool) -> torch.Tensor:
    """Run through `run_outside_graph` (the reasons are there)."""
    if grouped:
        return _grouped_matmul(rows, counts, weight)
    return torch.cat([chunk @ weight[e] for e, chunk in enumerate(rows.split(counts.tolist()))])
