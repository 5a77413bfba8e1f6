"""Gradient health's last resort: too many bad steps in a row roll the run back to its last checkpoint.

The veto itself stays inside the optimizer step, where DeepSpeed calls it
(`ava.train.engine.update_gate`): a bad step's update is never applied. When the
monitor asks for a rollback, this callback reloads the newest complete
checkpoint (weights, optimizer, the other callbacks' state) and the run
goes on from there with the data stream *past* the bad batches (PaLM's
remedy: the same batches would likely blow up again). With no checkpoint to
return to, or `max_rollbacks` used up, the run fails with the reason.
The monitor's own state travels in every checkpoint, so a resumed run
continues its baseline, cool-down and counts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ava.config.schema.training import GradientHealthConfig
from ava.train.engine.gradient_health import HealthMonitor
from ava.train.trainer.callback import Callback

if TYPE_CHECKING:
    from ava.train.trainer.trainer import StepOutcome, Trainer


class GradientHealth(Callback):
    """Rolls back on the monitor's request; records the monitor's interventions in the result."""

    name = "gradient_health"
    legacy_state_keys = ("health",)
    restore_on_rollback = False  # the monitor remembers the rollback itself (and counts it)

    def __init__(self, monitor: HealthMonitor, config: GradientHealthConfig, accumulation: int,
                 save_steps: int, save_strategy: str) -> None:
        self.monitor, self.config, self.accumulation = monitor, config, accumulation
        self.save_steps, self.save_strategy = save_steps, save_strategy

    def state_dict(self) -> dict[str, Any]:
        return self.monitor.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.monitor.load_state_dict(state)

    def on_step_end(self, trainer: Trainer, outcome: StepOutcome) -> None:
        verdict = outcome.output.verdict
        if verdict is None or not verdict.rollback:
            return
        step = outcome.step
        outcome.discard()
        point = trainer.checkpointer.latest() if trainer.checkpointer is not None else None
        if point is None or self.monitor.rollbacks_exhausted:
            for event in self.monitor.drain_events():
                trainer.log(event)
            reason = self._unrecoverable(step)
            trainer.stop("failed", {"step": step, "event": "run_failed", "reason": reason}, failure=reason)
            return
        to_step = trainer.restore(point, rollback=True)
        self.monitor.rolled_back(step, to_step, (step - to_step) * self.accumulation)
        for event in self.monitor.drain_events():
            trainer.log(event)

    def on_train_end(self, trainer: Trainer) -> None:
        trainer.result.health = self.monitor.summary()

    def _unrecoverable(self, step: int) -> str:
        """Why a run with repeated bad steps cannot go on, and what to change."""
        bad = f"{self.config.max_consecutive_bad_steps} bad steps in a row at step {step}"
        if self.monitor.rollbacks_exhausted:
            return (f"{bad} after {self.monitor.rollbacks} rollbacks (training.gradient_health.max_rollbacks): "
                    "training is not recovering. Lower training.learning_rate, or inspect the data around this step")
        return (f"{bad} and no checkpoint to roll back to. Save more often (training.save_steps, now "
                f"{self.save_steps}; save_strategy {self.save_strategy}) or lower training.learning_rate")
