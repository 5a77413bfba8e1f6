"""Stop cleanly when the scheduler asks: SIGTERM or SIGUSR1 -> finish the step, checkpoint, exit for requeue.

SLURM sends SIGTERM before it kills or preempts a job, and a signal of the
user's choice ahead of the time limit (`--signal`). The handler only sets a
flag: the loop checks it between steps, after all ranks agree (one MAX
all-reduce of a flag per step), so every rank stops after the same step and
writes the same checkpoint. The answer read after step N is the agreement
launched after step N-1: reading a GPU tensor at once would make the host wait
for all of step N's queued kernels every step, while last step's flag has long
arrived. The price is one more step (and an evaluation, if one falls due)
before the checkpoint, out of the grace period SLURM gives (`--signal` lead
time, or KillWait after SIGTERM). The process then exits with REQUEUE_EXIT_CODE,
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
        self._pending: _HostCopy | None = None

    def install(self) -> PreemptionFlag:
        """Take over SIGTERM and SIGUSR1 (main thread only; elsewhere signals cannot be handled)."""
        self._pending = None
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
        """Whether any rank had a stop signal by the previous call (a collective: every rank calls it every step).

        Every rank gets the same answer at the same step, one call after the
        signal: see the module docstring for why not at once.
        """
        flag = torch.tensor([1.0 if self.signal_name else 0.0], device=device)
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        previous, self._pending = self._pending, _HostCopy(flag)
        return previous is not None and previous.value()

    def __enter__(self) -> PreemptionFlag:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.uninstall()


class _HostCopy:
    """A one-element device tensor copied to the host without waiting; `value()` waits for that copy only."""

    def __init__(self, flag: torch.Tensor) -> None:
        self.event: torch.cuda.Event | None = None
        if flag.device.type == "cuda":
            self.host = torch.empty(flag.shape, dtype=flag.dtype, pin_memory=True)
            self.host.copy_(flag, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = flag.detach().to("cpu", copy=True)

    def value(self) -> bool:
        if self.event is not None:
            self.event.synchronize()
        return bool(self.host.item())
