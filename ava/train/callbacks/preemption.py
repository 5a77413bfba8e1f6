"""A stop signal ends the run cleanly: finish the step, checkpoint, exit (SIGTERM/SIGUSR1: for requeue; Ctrl-C: 130).

`PreemptionFlag` (`ava.train.runtime.preemption`) catches the signal; every rank asks
it after every step whether any rank has one (one small all-reduce), so all
ranks stop after the same step and write the same checkpoint. The process
then exits with `REQUEUE_EXIT_CODE` (or, after a Ctrl-C, `INTERRUPT_EXIT_CODE`),
and the job resumes inside the run (or the RLHF stage) with `--resume` /
`--auto_resume`. The trainer's status is "preempted" either way; the flag's
`status` tells the runner which of the two it was.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ava.train.runtime.preemption import PreemptionFlag
from ava.train.trainer.callback import Callback

if TYPE_CHECKING:
    from ava.train.trainer.trainer import StepOutcome, Trainer


class Preemption(Callback):
    """Checkpoints and stops the run with status "preempted" once any rank caught a stop signal."""

    name = "preemption"

    def __init__(self, flag: PreemptionFlag) -> None:
        self.flag = flag

    def on_step_end(self, trainer: Trainer, outcome: StepOutcome) -> None:
        if not self.flag.agreed(trainer.module.device):
            return
        trainer.save()
        step = outcome.step
        received = "Ctrl-C (SIGINT)" if self.flag.status == "interrupted" else self.flag.signal_name or "a stop signal"
        trainer.stop("preempted", {
            "step": step, "event": self.flag.status,
            "reason": f"{received} received (on some rank): checkpoint saved at step {step}; the run can resume "
                      "from it"})
