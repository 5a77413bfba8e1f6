"""The callback seam: every optional behaviour of a run is a `Callback` the `Trainer` calls at fixed points.

A callback overrides only the hooks it needs. The trainer calls them, in the
order the callbacks were given, at these points of a run:

    on_train_start(trainer)             the engine is built and any checkpoint restored; before step 1
    before_update(trainer, step)        after the step's last backward, before its optimizer step
                                        (pre-training; an RLHF step takes many updates and skips it)
    on_log(trainer, record)             every record the run logs: a step (on logging steps), an
                                        evaluation, an event; a callback may add keys for those after it
    on_step_end(trainer, outcome)       after each optimizer step; a callback may `outcome.discard()` it
                                        (a rollback), and the callbacks after it then do not see it;
                                        `trainer.save()` asks for a checkpoint of this step, written once
                                        every callback has handled it, `trainer.stop(status)` ends the run
    on_evaluate(trainer, result)        after each scheduled held-out evaluation of a pre-training run
    on_save(trainer, path)              after each checkpoint is complete on every rank
    on_train_end(trainer)               after the last step (also when the run stopped early)

In a run from `ava.train.run`, the order is: per-layer gradient norms,
gradient-health rollback, evaluation, the caller's callbacks, checkpointing,
preemption, then the sinks (metrics.jsonl, console, W&B), which therefore
write what the caller's callbacks add to a record, and a stop the caller's
callback asks for still gets the final checkpoint.

A callback with state a resumed run must continue returns it from
`state_dict()` (tensors and plain values only: checkpoints are read with
`torch.load(weights_only=True)`) and gets it back through `load_state_dict`
before `on_train_start`. It is stored in every checkpoint under the
callback's `name`, which is therefore unique within a run.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pathlib import Path

    from ava.train.trainer.trainer import StepOutcome, Trainer


class Callback:
    """Does nothing at every hook; subclasses override what they need. See the module docstring."""

    #: The key of this callback's state in a checkpoint; unique within a run.
    name: str = "callback"
    #: Keys an Ava that predates callbacks used for this state (read when `name` is absent).
    legacy_state_keys: tuple[str, ...] = ()
    #: Whether a gradient-health rollback restores this state from the checkpoint it returns to.
    restore_on_rollback: bool = True

    def on_train_start(self, trainer: Trainer) -> None:
        pass

    def before_update(self, trainer: Trainer, step: int) -> None:
        pass

    def on_log(self, trainer: Trainer, record: dict[str, Any]) -> None:
        pass

    def on_step_end(self, trainer: Trainer, outcome: StepOutcome) -> None:
        pass

    def on_evaluate(self, trainer: Trainer, result: Any) -> None:
        pass

    def on_save(self, trainer: Trainer, path: Path) -> None:
        pass

    def on_train_end(self, trainer: Trainer) -> None:
        pass

    def state_dict(self) -> dict[str, Any] | None:
        """The state a resume must continue from; None: this callback has none."""
        return None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class CallbackList:
    """The run's callbacks, called in order; also gathers and restores their checkpoint state."""

    def __init__(self, callbacks: Iterable[Callback] = ()) -> None:
        self.callbacks = list(callbacks)
        names = [c.name for c in self.callbacks if type(c).state_dict is not Callback.state_dict]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"callbacks with state must have unique names; repeated: {', '.join(repeated)}")

    def __iter__(self) -> Iterator[Callback]:
        return iter(self.callbacks)

    def on_train_start(self, trainer: Trainer) -> None:
        for c in self.callbacks:
            c.on_train_start(trainer)

    def before_update(self, trainer: Trainer, step: int) -> None:
        for c in self.callbacks:
            c.before_update(trainer, step)

    def on_log(self, trainer: Trainer, record: dict[str, Any]) -> None:
        for c in self.callbacks:
            c.on_log(trainer, record)

    def on_step_end(self, trainer: Trainer, outcome: StepOutcome) -> None:
        for c in self.callbacks:
            if outcome.discarded:
                return
            c.on_step_end(trainer, outcome)

    def on_evaluate(self, trainer: Trainer, result: Any) -> None:
        for c in self.callbacks:
            c.on_evaluate(trainer, result)

    def on_save(self, trainer: Trainer, path: Path) -> None:
        for c in self.callbacks:
            c.on_save(trainer, path)

    def on_train_end(self, trainer: Trainer) -> None:
        for c in self.callbacks:
            c.on_train_end(trainer)

    def state_dict(self) -> dict[str, Any]:
        """{callback name: state} for every callback that has state."""
        return {c.name: state for c in self.callbacks if (state := c.state_dict()) is not None}

    def load_state_dict(self, saved: dict[str, Any], rollback: bool = False) -> None:
        """Restore each callback's state from a checkpoint's client state (new or pre-callback layout)."""
        by_name = saved.get("callbacks")
        for c in self.callbacks:
            if rollback and not c.restore_on_rollback:
                continue
            if by_name is not None:
                state = by_name.get(c.name)
            else:  # written before callbacks: each state under its own top-level key
                state = next((saved[k] for k in c.legacy_state_keys if k in saved), None)
            if state is not None:
                c.load_state_dict(state)
