"""Injected numerical faults, so tests drive the real health code path under the real launcher.

Set `AVA_INJECT_FAULTS` to a comma-separated list of `KIND@STEP[-LAST][xFACTOR][:rankR]`:

- `grad_spike@8x1000`  gradients of step 8 multiplied by 1000 (the loss itself is unchanged);
- `nan_loss@12`        the loss of step 12 is NaN (so are its gradients);
- `nan_grad@20-22`     finite losses, NaN gradients, at steps 20, 21 and 22;
- `:rank1`             only on rank 1 (default: every rank).

A fault fires at most once per step number in a process, like a bad batch:
after a rollback the replayed steps train on other batches and are clean.
Faults apply to the first micro batch of the step.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

ENV_VAR = "AVA_INJECT_FAULTS"
KINDS = ("grad_spike", "nan_loss", "nan_grad")
DEFAULT_SPIKE = 1000.0
_SPEC = re.compile(r"^(?P<kind>[a-z_]+)@(?P<first>\d+)(?:-(?P<last>\d+))?(?:x(?P<factor>[0-9.eE+-]+))?"
                   r"(?::rank(?P<rank>\d+))?$")


class FaultSpecError(ValueError):
    """`AVA_INJECT_FAULTS` does not parse."""


@dataclass(frozen=True)
class Fault:
    kind: str
    first: int
    last: int
    factor: float = DEFAULT_SPIKE
    rank: int | None = None

    def hits(self, step: int, rank: int) -> bool:
        return self.first <= step <= self.last and (self.rank is None or self.rank == rank)


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient (NaN factor poisons it)."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor  # type: ignore[attr-defined]
        return x.view_as(x)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.factor, None  # type: ignore[attr-defined]


@dataclass
class FaultPlan:
    faults: list[Fault]
    fired: set[tuple[int, int]] = field(default_factory=set)  # (fault index, step)

    @classmethod
    def parse(cls, text: str) -> FaultPlan:
        faults = []
        for item in (part.strip() for part in text.split(",")):
            if not item:
                continue
            match = _SPEC.match(item)
            if match is None or match["kind"] not in KINDS:
                raise FaultSpecError(
                    f"{ENV_VAR}: cannot read {item!r}. Write KIND@STEP[-LAST][xFACTOR][:rankR] with KIND one of "
                    f"{', '.join(KINDS)}, e.g. grad_spike@8x1000,nan_grad@20-22:rank1")
            first = int(match["first"])
            last = int(match["last"] or first)
            if last < first:
                raise FaultSpecError(f"{ENV_VAR}: {item!r} ends before it starts; write the smaller step first")
            faults.append(Fault(match["kind"], first, last, float(match["factor"] or DEFAULT_SPIKE),
                                int(match["rank"]) if match["rank"] is not None else None))
        return cls(faults)

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> FaultPlan | None:
        text = environ.get(ENV_VAR, "").strip()
        return cls.parse(text) if text else None

    def apply(self, step: int, rank: int, loss: torch.Tensor) -> torch.Tensor:
        """The loss to backpropagate at `step` on `rank`: `loss` itself unless a fault fires."""
        for index, fault in enumerate(self.faults):
            if not fault.hits(step, rank) or (index, step) in self.fired:
                continue
            self.fired.add((index, step))
            if fault.kind == "nan_loss":
                loss = loss * float("nan")
            elif fault.kind == "nan_grad":
                loss = _ScaleGrad.apply(loss, float("nan"))
            else:
                loss = _ScaleGrad.apply(loss, fault.factor)
        return loss
