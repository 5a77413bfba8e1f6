"""Expert parallelism: the ranks of a group each hold E/P of a layer's experts and exchange rows with all-to-all.

Routing and the dispatch plan are those of the single-rank layer: every rank
routes its own tokens over all E experts and sorts the rows by expert, with
the same capacity and the same drops, so a layer gives the same result on any
number of expert-parallel ranks. Experts are owned in consecutive blocks
(rank r holds [r*E/P, (r+1)*E/P)), so rows sorted by expert are already
grouped by owning rank: one all-to-all sends each block to its owner, the
owner runs its experts, and the reverse all-to-all brings the outputs back in
the order `combine_rows` expects.

Dropped rows (capacity mode) travel too, with weight 0, exactly as the
single-rank layer computes them: fewer shapes to track, at the cost of
sending the (few) dropped rows.

The split sizes of an all-to-all must be Python ints, so each layer exchanges
its row counts first and reads them to the host: one device sync per MoE
layer per forward (backward reuses the sizes). The autograd functions below
make both movements differentiable: the gradient of an all-to-all is the same
exchange run backwards.

Every rank of the group must run the same sequence of MoE forwards (and
backwards): each is a collective. Training, evaluation and generation in
lockstep satisfy this; a forward on one rank alone hangs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ava.model.moe.experts import GroupedExperts


@dataclass(frozen=True)
class ExpertParallel:
    """This rank's place in an expert-parallel group of `size` ranks."""

    group: dist.ProcessGroup
    rank: int
    size: int

    def owned(self, num_experts: int) -> tuple[int, int]:
        """The [start, stop) range of the `num_experts` experts this rank holds."""
        if num_experts % self.size:
            raise ValueError(f"{num_experts} experts cannot be split evenly over {self.size} expert-parallel ranks")
        per_rank = num_experts // self.size
        return self.rank * per_rank, (self.rank + 1) * per_rank


class _AllToAll(torch.autograd.Function):
    """Rows split `send` ways out, `recv` ways in; backward sends the gradients back the way they came."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, send: list[int], recv: list[int], group: dist.ProcessGroup) -> torch.Tensor:
        ctx.send, ctx.recv, ctx.group = send, recv, group
        out = x.new_empty((sum(recv), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), output_split_sizes=recv, input_split_sizes=send, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out = grad.new_empty((sum(ctx.send), *grad.shape[1:]))
        dist.all_to_all_single(out, grad.contiguous(), output_split_sizes=ctx.send, input_split_sizes=ctx.recv,
                               group=ctx.group)
        return out, None, None, None


class _Permute(torch.autograd.Function):
    """x[order]; the gradient is grad[inverse]: a gather both ways, like the movements in `dispatch`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        return x.index_select(0, order)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


def _expert_major_order(received: torch.Tensor) -> torch.Tensor:
    """Reorder rows laid out source-major into expert-major.

    `received[s, e]` rows from source rank s for local expert e arrive
    consecutively, source by source; the experts need each expert's rows
    together. Row q of segment k (in expert-major order) comes from that
    segment's start in the received layout plus its offset within the segment.
    """
    lengths = received.reshape(-1)
    starts = (torch.cumsum(lengths, 0) - lengths).view_as(received).t().reshape(-1)
    lengths = received.t().reshape(-1)
    offsets = torch.cumsum(lengths, 0) - lengths
    return torch.arange(int(lengths.sum())) + torch.repeat_interleave(starts - offsets, lengths)


def run_experts_across_ranks(experts: GroupedExperts, rows: torch.Tensor, counts: torch.Tensor,
                             ep: ExpertParallel) -> torch.Tensor:
    """The expert outputs for `rows`, computed by the ranks that own the experts.

    `rows` (N, H) are sorted by global expert and `counts` (E,) are the rows
    per expert, as the single-rank layer has them; `experts` holds this rank's
    E/P experts. The result is in the order of `rows`.
    """
    local = experts.num_experts
    received = torch.empty_like(counts)
    dist.all_to_all_single(received, counts, group=ep.group)  # [s*local + e]: rows source s has for my expert e
    sizes = torch.stack([counts, received]).cpu()  # the one host sync: split sizes must be Python ints
    send = sizes[0].view(ep.size, local).sum(1).tolist()
    from_source = sizes[1].view(ep.size, local)
    recv = from_source.sum(1).tolist()
    arrived = _AllToAll.apply(rows, send, recv, ep.group)
    if local == 1:  # source-major is already expert-major
        return _AllToAll.apply(experts(arrived, from_source.sum(0).to(counts.device)), recv, send, ep.group)
    order = _expert_major_order(from_source).to(rows.device)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    out = experts(_Permute.apply(arrived, order, inverse), from_source.sum(0).to(counts.device))
    return _AllToAll.apply(_Permute.apply(out, inverse, order), recv, send, ep.group)
