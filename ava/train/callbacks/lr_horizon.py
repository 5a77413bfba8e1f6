"""The LR decay horizon a run started with, kept across a resume that changes the run's length.

The schedule decays over the run's planned steps (`training.max_steps`, or
`num_epochs` passes). Resumed with another `max_steps`, a schedule re-derived
from the new length would jump at the resume step (from `lr_end` back up,
when a finished run is extended), silently. Instead the horizon is part of
every checkpoint, and a resumed run keeps it: the LR goes on as before the
stop, a longer run trains on at `lr_end` past the old horizon, and an event
record (and console line) says what that means, with the numbers
(`ava.train.engine.lr_schedule.horizon_note`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ava.train.engine.lr_schedule import LRSchedule, horizon_note
from ava.train.engine.optimizer_step import OptimizerStep
from ava.train.trainer.callback import Callback

if TYPE_CHECKING:
    from ava.train.trainer.trainer import Trainer


class LRHorizon(Callback):
    """Saves `optimizer.schedule`'s horizon; on resume, rebuilds the schedule over the saved one (`schedule_for`)."""

    name = "lr_schedule"

    def __init__(self, optimizer: OptimizerStep, schedule_for: Callable[[int], LRSchedule]) -> None:
        self.optimizer, self.schedule_for = optimizer, schedule_for
        self._derived: LRSchedule | None = None  # this run's own schedule, when a checkpoint's replaced it

    def state_dict(self) -> dict[str, Any]:
        return {"total_steps": self.optimizer.schedule.total_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        total = int(state["total_steps"])
        if total != self.optimizer.schedule.total_steps:
            self._derived = self._derived or self.optimizer.schedule
            self.optimizer.schedule = self.schedule_for(total)

    def on_train_start(self, trainer: Trainer) -> None:
        if self._derived is None or not trainer.resumed:
            return
        note = horizon_note(self.optimizer.schedule, self._derived, trainer.step, trainer.planned_steps)
        if note is not None:
            trainer.log({"step": trainer.step, "event": "lr_schedule_kept", "reason": note})
