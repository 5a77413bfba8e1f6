"""Mixture-of-Head attention (MoH; Jin et al. 2024, "MoH: Multi-Head Attention as Mixture-of-Head Attention").

Multi-head attention is a sum over heads of head_i @ W_o^i. MoH makes that a
weighted sum in which each token uses only some heads: `num_shared` heads are
always on, and a router picks the top-k of the remaining routed heads per
token. Three small gates decide the weights, as in the paper: a softmax over
the shared heads, a softmax over the routed heads (kept to the top k and
renormalised), and a two-way softmax that balances the shared group against
the routed group.

One departure, on purpose: the paper's weights sum to 1 over the active heads,
which shrinks the output by the number of heads compared with standard
attention. Here each group's weights are scaled by the number of heads active
in it and by the number of groups, so a uniform router gives every active head
weight exactly 1. With every head active and a uniform router the layer *is*
standard multi-head attention (the test pins this), and a model starts from
the familiar scale.

The heads run as one dense SDPA call and inactive heads are weighted 0. The
compute saving MoH promises (a token needs only its active heads' attention)
needs a per-token sparse attention kernel, which PyTorch does not have; `ava
model summary` reports the saving such a kernel would realise, and the
benchmarks measure what this implementation really costs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ava.model.attention import CausalSelfAttention
from ava.model.attention_interface import AttentionInputs, Rope
from ava.model.kv_cache import KVCache
from ava.model.moe.losses import load_balancing_loss, router_z_loss
from ava.model.moe.metrics import MoEStats


class HeadRouter(nn.Module):
    """The three MoH gates; arithmetic in float32, like the expert router (see `ava.model.moe.router`)."""

    def __init__(self, hidden_size: int, num_shared: int, num_routed: int, top_k: int) -> None:
        super().__init__()
        self.num_shared, self.num_routed, self.top_k = num_shared, num_routed, top_k
        self.shared_gate = nn.Linear(hidden_size, num_shared, bias=False) if num_shared else None
        self.routed_gate = nn.Linear(hidden_size, num_routed, bias=False)
        self.group_gate = nn.Linear(hidden_size, 2, bias=False) if num_shared else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-token head weights (tokens, heads), routed probs and logits, and the routed top-k ids."""
        dtype = torch.promote_types(x.dtype, torch.float32)
        x = x.to(dtype)
        logits = F.linear(x, self.routed_gate.weight.to(dtype))
        probs = torch.softmax(logits, dim=-1)
        top, ids = torch.topk(probs, self.top_k, dim=-1)
        routed = torch.zeros_like(probs).scatter(-1, ids, top / top.sum(-1, keepdim=True))
        if self.shared_gate is None or self.group_gate is None:
            return routed * self.top_k, probs, logits, ids
        shared = torch.softmax(F.linear(x, self.shared_gate.weight.to(dtype)), dim=-1)
        group = torch.softmax(F.linear(x, self.group_gate.weight.to(dtype)), dim=-1)
        weights = torch.cat([2 * group[:, :1] * self.num_shared * shared, 2 * group[:, 1:] * self.top_k * routed], -1)
        return weights, probs, logits, ids


class MixtureOfHeadsAttention(CausalSelfAttention):
    """Causal self-attention whose heads are weighted per token by a `HeadRouter`.

    Heads 0..num_shared-1 are the shared heads, the rest routed. Parameter
    names are those of `CausalSelfAttention` plus `router.*`.
    """

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, bias: bool, dropout: float,
                 num_shared: int, active_routed: int, aux_loss_coef: float, z_loss_coef: float) -> None:
        super().__init__(hidden_size, num_heads, num_kv_heads, bias, dropout)
        num_routed = num_heads - num_shared
        if num_routed < 1 or not 1 <= active_routed <= num_routed:
            raise ValueError(f"MoH needs 1 <= active_routed ({active_routed}) <= routed heads ({num_routed})")
        self.router = HeadRouter(hidden_size, num_shared, num_routed, active_routed)
        self.aux_loss_coef, self.z_loss_coef = aux_loss_coef, z_loss_coef

    @property
    def active_fraction(self) -> float:
        """Share of heads a token uses: what a sparse kernel would save of attention's cost."""
        return (self.router.num_shared + self.router.top_k) / self.num_heads

    def forward(self, x: torch.Tensor, rope: Rope | None, cache: KVCache | None = None, layer: int = 0,
                mask: torch.Tensor | None = None, inputs: AttentionInputs | None = None) -> tuple[torch.Tensor, MoEStats]:
        """The router-weighted heads through the output projection, and the head router's stats."""
        batch, seq, _ = x.shape
        weights, probs, logits, ids = self.router(x.reshape(batch * seq, -1))
        heads = self.heads(x, rope, cache, layer, mask)
        y = heads * weights.view(batch, seq, self.num_heads, 1).to(heads.dtype)
        return self.o_proj(y.flatten(2)), self._stats(probs, logits, ids)

    def _stats(self, probs: torch.Tensor, logits: torch.Tensor, ids: torch.Tensor) -> MoEStats:
        load = torch.zeros(self.router.num_routed, dtype=torch.int64, device=ids.device)
        load.scatter_add_(0, ids.reshape(-1), torch.ones_like(ids.reshape(-1)))
        aux = load_balancing_loss(probs, load, self.router.top_k)
        z = router_z_loss(logits)
        with torch.no_grad():
            entropy = -(probs * probs.clamp_min(1e-20).log()).sum(-1).mean()
        return MoEStats(router_loss=self.aux_loss_coef * aux + self.z_loss_coef * z, aux_loss=aux.detach(),
                        z_loss=z.detach(), load=load, dropped_fraction=torch.zeros((), device=ids.device),
                        entropy=entropy, kind="moh")
