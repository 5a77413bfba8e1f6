"""Stop cleanly when the scheduler asks (SIGTERM, SIGUSR1: exit for requeue) or a person does (Ctrl-C: exit 130).

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

Ctrl-C (SIGINT) is a person's stop: the same step, agreement and checkpoint,
then exit INTERRUPT_EXIT_CODE (130, what a shell reports for a Ctrl-C), not a
requeue. A terminal sends it to every process of the job at once; the
deepspeed launcher answers it by sending its ranks SIGTERM (and SIGKILL 30 s
later), so a Ctrl-C on any rank outranks a requeue signal in the agreement.
A second Ctrl-C stops at once (KeyboardInterrupt: no new checkpoint, and the
store never trusts a half-written one); a third ends the process even if the
unwinding after the second hangs.
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType
from typing import Any

import torch

REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: try again later
INTERRUPT_EXIT_CODE = 130  # 128 + SIGINT
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# What each rank contributes to the agreement (the MAX over ranks wins): a Ctrl-C outranks a requeue signal.
_NONE, _REQUEUE, _INTERRUPT = 0.0, 1.0, 2.0
ACKNOWLEDGED = ("ava: Ctrl-C: the run stops after this step, with a checkpoint; "
                "Ctrl-C again stops at once, without one\n")


class PreemptionFlag:
    """Set by SIGTERM/SIGUSR1 and Ctrl-C; `agreed()` tells every rank whether any rank has been asked to stop.

    `status` then says how the run ends: "preempted" (exit 75, requeue) or
    "interrupted" (exit 130: some rank had a Ctrl-C).
    """

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self.interrupts = 0  # Ctrl-Cs received by this process
        self.status = "preempted"
        self._previous: dict[int, Any] = {}
        self._pending: _HostCopy | None = None

    def install(self) -> PreemptionFlag:
        """Take over SIGTERM, SIGUSR1 and SIGINT (main thread only; elsewhere signals cannot be handled)."""
        self._pending = None
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
            self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._interrupt)
        return self

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if not self.interrupts:  # the launcher's SIGTERM after a Ctrl-C does not rename it
            self.signal_name = signal.Signals(signum).name

    def _interrupt(self, signum: int, frame: FrameType | None) -> None:
        self.interrupts += 1
        if self.interrupts == 1:
            self.signal_name = "SIGINT"
            if os.environ.get("RANK", "0") == "0":
                os.write(2, ACKNOWLEDGED.encode())  # not print(): the handler may run inside another print
            return
        if self.interrupts == 2:
            raise KeyboardInterrupt
        os._exit(INTERRUPT_EXIT_CODE)

    def agreed(self, device: torch.device) -> bool:
        """Whether any rank had a stop signal by the previous call (a collective: every rank calls it every step).

        Every rank gets the same answer at the same step, one call after the
        signal: see the module docstring for why not at once. `status` says
        which kind of stop they agreed on.
        """
        mine = _INTERRUPT if self.interrupts else _REQUEUE if self.signal_name else _NONE
        flag = torch.tensor([mine], device=device)
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        previous, self._pending = self._pending, _HostCopy(flag)
        if previous is None:
            return False
        agreed = previous.value()
        if agreed == _INTERRUPT:
            self.status = "interrupted"
        return agreed != _NONE

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

    def value(self) -> float:
        if self.event is not None:
            self.event.synchronize()
        return float(self.host.item())
