"""Injected numerical faults, so tests drive the real health code path under the real launcher.

Set `AVA_INJECT_FAULTS` to a comma-separated list of `KIND@STEP[-LAST][xFACTOR][:rankR]`:

- `grad_spike@8x1000`  gradients of step 8 multiplied by 1000 (the loss itself is unchanged);
- `nan_loss@12`        the loss of step 12 is NaN (so are its gradients);
- `nan_grad@20-22`     finite losses, NaN gradients, at steps 20, 21 and 22;
- `:rank1`             only on rank 1 (default: every rank).

Process faults, for the fault-tolerance tests (`tests/robustness/test_faults.py`):

- `kill@5:rank1`                rank 1 SIGKILLs itself in the middle of step 5 (after its forward pass);
- `error@5:rank1`               rank 1 raises a RuntimeError there instead: a bug met on one rank only;
- `kill_in_save@4/after_state`  SIGKILL at one point of writing checkpoint 4 (`SAVE_POINTS`);
- `disk_full@4`                 writing checkpoint 4 fails with ENOSPC after DeepSpeed's files are written.

A fault fires at most once per step number in a process, like a bad batch:
after a rollback the replayed steps train on other batches and are clean.
Faults apply to the first micro batch of the step. RLHF stages take the
process faults (`kill`, `error`, at the start of a stage step) and the
checkpoint ones; the numeric ones are for pre-training.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from ava.errors import UserError

ENV_VAR = "AVA_INJECT_FAULTS"
NUMERIC_KINDS = ("grad_spike", "nan_loss", "nan_grad")
PROCESS_KINDS = ("kill", "error")
KINDS = (*NUMERIC_KINDS, *PROCESS_KINDS, "kill_in_save", "disk_full")
# The moments of `ava.train.checkpoint.store.save`, in order, at which a process can die.
SAVE_POINTS = ("before_deepspeed", "after_deepspeed", "after_state", "after_complete", "after_latest",
               "during_prune")
DEFAULT_SPIKE = 1000.0
_SPEC = re.compile(r"^(?P<kind>[a-z_]+)@(?P<first>\d+)(?:-(?P<last>\d+))?(?:x(?P<factor>[0-9.eE+-]+))?"
                   r"(?:/(?P<point>[a-z_]+))?(?::rank(?P<rank>\d+))?$")


class FaultSpecError(ValueError):
    """`AVA_INJECT_FAULTS` does not parse."""


class InjectedError(RuntimeError):
    """The `error` fault: stands for a bug that one rank meets on its own."""


@dataclass(frozen=True)
class Fault:
    kind: str
    first: int
    last: int
    factor: float = DEFAULT_SPIKE
    rank: int | None = None
    point: str | None = None  # kill_in_save: which of SAVE_POINTS

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
                    f"{ENV_VAR}: cannot read {item!r}. Write KIND@STEP[-LAST][xFACTOR][/POINT][:rankR] with KIND one "
                    f"of {', '.join(KINDS)}, e.g. grad_spike@8x1000,nan_grad@20-22:rank1,kill_in_save@4/after_state")
            if (match["kind"] == "kill_in_save") != (match["point"] is not None) or (
                    match["point"] is not None and match["point"] not in SAVE_POINTS):
                raise FaultSpecError(f"{ENV_VAR}: {item!r}: kill_in_save needs /POINT, one of {', '.join(SAVE_POINTS)} "
                                     "(and only kill_in_save takes one)")
            first = int(match["first"])
            last = int(match["last"] or first)
            if last < first:
                raise FaultSpecError(f"{ENV_VAR}: {item!r} ends before it starts; write the smaller step first")
            faults.append(Fault(match["kind"], first, last, float(match["factor"] or DEFAULT_SPIKE),
                                int(match["rank"]) if match["rank"] is not None else None, match["point"]))
        return cls(faults)

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> FaultPlan | None:
        text = environ.get(ENV_VAR, "").strip()
        return cls.parse(text) if text else None

    def apply(self, step: int, rank: int, loss: torch.Tensor) -> torch.Tensor:
        """The loss to backpropagate at `step` on `rank`: `loss` itself unless a fault fires."""
        self.at_step(step, rank)
        for index, fault in enumerate(self.faults):
            if fault.kind not in NUMERIC_KINDS or not fault.hits(step, rank) or (index, step) in self.fired:
                continue
            self.fired.add((index, step))
            if fault.kind == "nan_loss":
                loss = loss * float("nan")
            elif fault.kind == "nan_grad":
                loss = _ScaleGrad.apply(loss, float("nan"))
            else:
                loss = _ScaleGrad.apply(loss, fault.factor)
        return loss

    def at_step(self, step: int, rank: int) -> None:
        """The process faults of `step` on `rank`: die there (`kill`) or raise (`error`) if planned."""
        for index, fault in enumerate(self.faults):
            if fault.kind not in PROCESS_KINDS or not fault.hits(step, rank) or (index, step) in self.fired:
                continue
            self.fired.add((index, step))
            if fault.kind == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise InjectedError(f"injected error at step {step} on rank {rank} ({ENV_VAR})")

    def at_save(self, step: int, rank: int, point: str) -> None:
        """Called at each of `SAVE_POINTS` while checkpoint `step` is written: die or fail there if planned."""
        for fault in self.faults:
            if not fault.hits(step, rank):
                continue
            if fault.kind == "kill_in_save" and fault.point == point:
                os.kill(os.getpid(), signal.SIGKILL)
            if fault.kind == "disk_full" and point == "after_deepspeed":
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f"checkpoint step {step} (injected)")


def plan_for_run(environ: Mapping[str, str]) -> FaultPlan | None:
    """The faults a run injects (`AVA_INJECT_FAULTS`), with a warning from rank 0; a malformed value is a user error."""
    try:
        plan = FaultPlan.from_env(environ)
    except FaultSpecError as exc:
        raise UserError(str(exc), f"fix or unset {ENV_VAR}") from None
    if plan is not None and environ.get("RANK", "0") == "0":
        print(f"warning: {ENV_VAR} is set: injecting {environ[ENV_VAR]} (a test hook; unset it for real training)",
              file=sys.stderr)
    return plan
