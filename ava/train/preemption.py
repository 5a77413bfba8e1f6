"""Stop cleanly when the scheduler asks: SIGTERM or SIGUSR1 -> finish the step, checkpoint, exit for requeue.

SLURM sends SIGTERM before it kills or preempts a job, and a signal of the
user's choice ahead of the time limit (`--signal`). The handler only sets a
flag: the loop checks it between steps, after all ranks agree (one MAX
all-reduce of a flag per step), so every rank stops after the same step and
writes the same checkpoint. The process then exits with REQUEUE_EXIT_CODE,
which launch/slurm/*.sbatch read to requeue the job; the requeued job resumes
with `--auto_resume`.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

import torch

REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: try again later
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionFlag:
    """Set by SIGTERM/SIGUSR1; `agreed()` tells every rank whether any rank has been asked to stop."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> PreemptionFlag:
        """Take over SIGTERM and SIGUSR1 (main thread only; elsewhere signals cannot be handled)."""
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signal_name = signal.Signals(signum).name

    def agreed(self, device: torch.device) -> bool:
        """Whether any rank got a stop signal (a collective: every rank calls it after every step)."""
        flag = torch.tensor([1.0 if self.signal_name else 0.0], device=device)
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    def __enter__(self) -> PreemptionFlag:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.uninstall()
