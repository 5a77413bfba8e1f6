"""The learning-rate schedule: warmup from 0 to the peak, then decay to `lr_end`.

One pure function of the step, so it can be checked on paper, plotted before a
run, and resumed exactly (the step alone determines the rate: no scheduler
state can drift). `LRSchedule.multiplier` plugs into torch's LambdaLR.
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
