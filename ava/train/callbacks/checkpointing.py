"""When a run saves: every `save_every` steps, at the end (or an early stop), and at each new best evaluation.

The writing itself is the run's `Checkpointer` (`trainer.save()`). A step
whose update the gradient-health gate skipped saves no periodic checkpoint:
a rollback must land on weights from a healthy step. `save_strategy: best`
keeps only improvements: no final checkpoint unless it is the best. The best
checkpoint is not a copy: `best` names one of the step checkpoints, and
pruning never removes it. At the end, the final checkpoint is reloaded and
must give the same held-out loss, bit for bit.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ava.train.checkpoint import store as checkpoint
from ava.train.trainer.callback import Callback

if TYPE_CHECKING:
    from ava.train.trainer.trainer import StepOutcome, Trainer


class Checkpointing(Callback):
    """Saves on the run's schedule; `save_every` 0 saves no periodic checkpoints."""

    name = "checkpointing"

    def __init__(self, save_every: int, saves_at_end: bool, save_best: bool, keep_last: int,
                 verify_reload: bool = True) -> None:
        self.save_every, self.saves_at_end, self.save_best = save_every, saves_at_end, save_best
        self.keep_last, self.verify_reload = keep_last, verify_reload
        self._best_due = False  # this step's evaluation is the best so far: its checkpoint becomes `best`
        self._best_at: int | None = None

    def on_evaluate(self, trainer: Trainer, result: Any) -> None:
        self._best_due = self.save_best and result.improved

    def on_step_end(self, trainer: Trainer, outcome: StepOutcome) -> None:
        step, best, self._best_due = outcome.step, self._best_due, False
        periodic = bool(self.save_every) and step % self.save_every == 0 and outcome.update_applied
        final = self.saves_at_end and (step == trainer.planned_steps or trainer.stopping)
        self._best_at = step if best else None
        if periodic or final or best:
            trainer.save()

    def on_save(self, trainer: Trainer, path: Any) -> None:
        if self._best_at == trainer.step:
            self._best_at = None
            if trainer.rank == 0:
                checkpoint.mark_best(trainer.checkpointer.root, trainer.step)
                checkpoint.prune(trainer.checkpointer.root, self.keep_last)  # the previous best is unprotected now

    def on_train_end(self, trainer: Trainer) -> None:
        point, saver = trainer.result.checkpoint, trainer.checkpointer
        check = getattr(trainer.module, "reload_matches", None)
        if self.verify_reload and check is not None and point is not None and saver is not None \
                and saver.saved_step == trainer.result.steps:
            trainer.result.checkpoint_reload_ok = check(point, lambda p: saver.load(trainer, p))
