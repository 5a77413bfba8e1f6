"""All experts of one layer as stacked weight tensors, run as one grouped matmul.

Stacking (E, ...) keeps the layout DeepSpeed's expert parallelism expects:
an expert-parallel rank owns a slice along dim 0, and a ZeRO-3 leaf module
gathers the whole stack at once.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ava.model.compile import run_outside_graph
from ava.model.mlp import activate


def grouped_mm_supported(dtype: torch.dtype, widths: tuple[int, ...]) -> bool:
    """torch's grouped GEMM takes fp32/bf16/fp16 operands whose rows are multiples of 16 bytes."""
    if not hasattr(F, "grouped_mm") or dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    size = torch.tensor([], dtype=dtype).element_size()
    return all(w * size % 16 == 0 for w in widths)


class GroupedExperts(nn.Module):
    """E feed-forward experts as stacked (E, in, out) weights: gate_proj and up_proj (E, H, I), down_proj (E, I, H).

    gate_proj exists for swiglu only. Gate and up stay separate for the reason
    given in `DenseMLP`: no gradient concatenation in backward.
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, activation: str) -> None:
        super().__init__()
        self.num_experts, self.activation = num_experts, activation
        self.gate_proj = (nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
                          if activation == "swiglu" else None)
        self.up_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size))
        self.widths = (hidden_size, intermediate_size)
        self.fp8_matmul: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None

    def use_fp8(self, matmul: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None) -> None:
        """Run every expert matmul as `matmul(rows, weight)` (an FP8 matmul, see `ava.train.engine.precision`); None: off.

        The weights stay ordinary stacked parameters, so ZeRO and expert
        parallelism handle them as before; only the forward changes.
        """
        self.fp8_matmul = matmul

    @torch.no_grad()
    def keep_experts(self, start: int, stop: int) -> None:
        """Drop every expert but [start, stop): what one expert-parallel rank keeps of a layer built whole.

        The kept slices are copied into new parameters, so the dropped experts'
        memory is freed (a view would keep the whole stack alive).
        """
        for name in ("gate_proj", "up_proj", "down_proj"):
            weight = getattr(self, name)
            if weight is not None:
                setattr(self, name, nn.Parameter(weight[start:stop].clone(), requires_grad=weight.requires_grad))
        self.num_experts = stop - start

    def forward(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Expert e transforms rows[offset_e : offset_e + counts[e]] (rows sorted by expert)."""
        if self.fp8_matmul is not None:
            return run_outside_graph(self.forward_fp8, rows, counts)
        if rows.dtype == self.down_proj.dtype and grouped_mm_supported(rows.dtype, self.widths):
            if rows.dtype != torch.bfloat16 and torch.compiler.is_compiling():
                return run_outside_graph(self.forward_grouped, rows, counts)
            return self.forward_grouped(rows, counts)
        return run_outside_graph(self.forward_loop, rows, counts)

    def forward_grouped(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """All experts as three grouped GEMMs over the expert-sorted rows; no host sync."""
        offsets = torch.cumsum(counts, 0).to(torch.int32)
        up = F.grouped_mm(rows, self.up_proj, offs=offsets)
        if self.gate_proj is not None:
            h = F.silu(F.grouped_mm(rows, self.gate_proj, offs=offsets)) * up
        else:
            h = activate(up, self.activation)
        return F.grouped_mm(h, self.down_proj, offs=offsets)

    def forward_loop(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Reference path, one matmul per expert: for dtypes grouped_mm lacks (float64 gradcheck)."""
        outputs = []
        for e, chunk in enumerate(rows.split(counts.tolist())):
            up = chunk @ self.up_proj[e]
            h = F.silu(chunk @ self.gate_proj[e]) * up if self.gate_proj is not None else activate(up, self.activation)
            outputs.append(h @ self.down_proj[e])
        return torch.cat(outputs)

    def forward_fp8(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """`forward_loop` with each expert's matmuls run by `fp8_matmul`.

        One matmul per expert: torchao's FP8 matmul takes a 2-D weight, and its
        grouped FP8 GEMM (a prototype) replaces the parameters with tensor
        subclasses that ZeRO cannot flatten. An expert that received no rows multiplies its empty chunk in high
        precision: an FP8 scale of an empty tensor is undefined, and the
        (empty) matmul keeps its weights in the graph with a zero gradient.
        """
        assert self.fp8_matmul is not None
        outputs = []
        for e, chunk in enumerate(rows.split(counts.tolist())):
            mm = self.fp8_matmul if chunk.shape[0] else torch.matmul
            up = mm(chunk, self.up_proj[e])
            h = F.silu(mm(chunk, self.gate_proj[e])) * up if self.gate_proj is not None else activate(up, self.activation)
            outputs.append(mm(h, self.down_proj[e]))
        return torch.cat(outputs)
