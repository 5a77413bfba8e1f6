"""The learning-rate schedule: warmup from 0 to the peak, then decay to `lr_end`.

One pure function of the step, so it can be checked on paper, plotted before a
run, and resumed exactly (the step alone determines the rate: no scheduler
state can drift). `LRSchedule.multiplier` plugs into torch's LambdaLR.

On a resume that changes the run's length (`max_steps`, or `num_epochs`),
the schedule keeps the decay horizon the run started with, which its
checkpoint records (`ava.train.callbacks.lr_horizon`): the LR then goes on
exactly as before the stop instead of jumping at the resume step, and a longer
run trains on at `lr_end` once that horizon has passed. `horizon_note` says
so, with the numbers, when it makes a difference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class LRSchedule:
    """Warmup (`linear` or `cosine`) over `warmup_steps`, then `cosine`, `linear` or `constant` decay.

    The decay runs from `peak` at the end of warmup to `end` at `total_steps`
    and stays at `end` afterwards; `constant` holds the peak.
    """

    peak: float
    end: float
    warmup_steps: int
    total_steps: int
    warmup: str = "linear"
    decay: str = "cosine"

    def __post_init__(self) -> None:
        if self.warmup not in ("linear", "cosine") or self.decay not in ("cosine", "linear", "constant"):
            raise ValueError(f"unknown schedule shape: warmup {self.warmup!r}, decay {self.decay!r}")
        if self.total_steps < 1 or not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(f"need 0 <= warmup_steps ({self.warmup_steps}) <= total_steps ({self.total_steps})")

    def lr(self, step: int) -> float:
        """The learning rate used for optimizer step `step` (0-based)."""
        if step < self.warmup_steps:
            fraction = (step + 1) / self.warmup_steps  # step 0 trains at a small non-zero rate
            if self.warmup == "cosine":
                fraction = 0.5 * (1.0 - math.cos(math.pi * fraction))
            return self.peak * fraction
        if self.decay == "constant":
            return self.peak
        span = self.total_steps - self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / span) if span > 0 else 1.0
        if self.decay == "linear":
            shape = 1.0 - progress
        else:
            shape = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.end + (self.peak - self.end) * shape

    def multiplier(self, step: int) -> float:
        """lr(step) / peak: the factor torch.optim.lr_scheduler.LambdaLR expects."""
        return self.lr(step) / self.peak


def horizon_note(kept: LRSchedule, derived: LRSchedule, resumed_at: int, planned: int) -> str | None:
    """What keeping the checkpoint's schedule `kept` instead of `derived` (this run's length) means, in words.

    `resumed_at` is the step of the checkpoint, `planned` the step the run now
    ends at. None when both give the same rates (a constant decay after the
    same warmup).
    """
    if kept == derived or (kept.decay == derived.decay == "constant" and kept.warmup_steps == derived.warmup_steps):
        return None
    after = (f"from step {kept.total_steps + 1} to step {planned} it stays at lr_end {kept.end:.3g}"
             if planned > kept.total_steps else
             f"the run now ends at step {planned} with the LR at {kept.lr(planned - 1):.3g}, before the decay ends")
    return (f"the LR schedule keeps the checkpoint's decay over {kept.total_steps} steps, not the {planned} now "
            f"planned, so the LR does not jump at the resume: step {resumed_at + 1} trains at "
            f"{kept.lr(resumed_at):.3g} (a schedule re-derived over {planned} steps would give "
            f"{derived.lr(resumed_at):.3g}), and {after}. To decay over {planned} steps, start a new run")
