"""The Trainer's loop and its callback protocol, on a toy module: no DeepSpeed, no model, only the rules.

The rules a callback author relies on: hooks in order, a record a callback
adds keys to reaches the callbacks after it, a discarded (rolled-back) step
is not seen by the callbacks after the one that discarded it, the gravest
stop wins, each callback's state is saved under its name and restored
before `on_train_start`, and a checkpoint from before callbacks existed
still restores by its old keys.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from ava.train.engine.gradient_health import Verdict
from ava.train.trainer import Callback, CallbackList, StepOutput, Trainer


class ToyModule:
    """Counts its steps; its "loss" at step s is 1/s. Logs a record with that loss on logging steps."""

    tokens_per_step = 10
    flops_per_token = 6.0

    def __init__(self, rollback_at: int | None = None) -> None:
        self.position = 0
        self.rollback_at = rollback_at
        self.before_update_calls: list[int] = []

    @property
    def engines(self) -> dict[str, Any]:
        return {}

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def train_step(self, step: int, logs: bool, before_update) -> StepOutput:
        self.position += 1
        before_update()
        loss = torch.tensor(1.0 / step)
        verdict = Verdict(apply=False, kind="nonfinite", rollback=True) if step == self.rollback_at else None
        return StepOutput(loss, loss, verdict, record={"loss": 1.0 / step} if logs else None)

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position = state["position"]


class Recorder(Callback):
    name = "recorder"

    def __init__(self, log: list) -> None:
        self.log, self.seen = log, 0

    def on_train_start(self, trainer: Trainer) -> None:
        self.log.append(("start", trainer.step))

    def before_update(self, trainer: Trainer, step: int) -> None:
        self.log.append(("before_update", step))

    def on_log(self, trainer: Trainer, record: dict[str, Any]) -> None:
        self.log.append(("log", dict(record)))

    def on_step_end(self, trainer: Trainer, outcome: Any) -> None:
        self.seen += 1
        self.log.append(("step_end", outcome.step))

    def on_train_end(self, trainer: Trainer) -> None:
        self.log.append(("end", trainer.step))

    def state_dict(self) -> dict[str, Any]:
        return {"seen": self.seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seen = state["seen"]


class Tagger(Callback):
    name = "tagger"

    def on_log(self, trainer: Trainer, record: dict[str, Any]) -> None:
        record["tag"] = "added"


def test_hooks_run_in_order_and_a_callback_can_add_keys_for_those_after_it():
    log: list = []
    result = Trainer(ToyModule(), 4, logging_steps=2, callbacks=[Tagger(), Recorder(log)]).fit()
    assert result.steps == 4 and result.status == "completed"
    assert log[0] == ("start", 0) and log[-1] == ("end", 4)
    steps = [entry for entry in log if entry[0] in ("before_update", "step_end")]
    assert steps == [(kind, s) for s in range(1, 5) for kind in ("before_update", "step_end")]
    records = [entry[1] for entry in log if entry[0] == "log"]
    assert [r["step"] for r in records] == [2, 4]
    assert all(r["tag"] == "added" and r["tokens_per_s"] > 0 for r in records)
    assert records[0]["mfu_flops_per_s"] == pytest.approx(6.0 * records[0]["tokens_per_s"])
    assert result.losses == pytest.approx([1.0, 0.5, 1 / 3, 0.25]) and result.tokens == 40


class Discarder(Callback):
    name = "discarder"

    def on_step_end(self, trainer: Trainer, outcome: Any) -> None:
        if outcome.step == 2:
            outcome.discard()


def test_a_discarded_step_is_not_seen_by_the_callbacks_after_the_one_that_discarded_it():
    before, after = Recorder([]), Recorder([])
    before.name, after.name = "before", "after"
    Trainer(ToyModule(), 3, logging_steps=1, callbacks=[before, Discarder(), after]).fit()
    assert before.seen == 3 and after.seen == 2


class Stopper(Callback):
    def __init__(self, name: str, status: str, at: int) -> None:
        self.name, self.status, self.at = name, status, at

    def on_step_end(self, trainer: Trainer, outcome: Any) -> None:
        if outcome.step == self.at:
            trainer.stop(self.status, {"step": outcome.step, "event": self.status})


def test_the_gravest_stop_wins_and_only_its_event_is_logged():
    log: list = []
    callbacks = [Stopper("a", "preempted", 2), Stopper("b", "early_stopped", 2), Recorder(log)]
    result = Trainer(ToyModule(), 10, logging_steps=100, callbacks=callbacks).fit()
    assert result.status == "preempted" and result.steps == 2
    assert [e[1]["event"] for e in log if e[0] == "log" and "event" in e[1]] == ["preempted"]


class MemoryCheckpointer:
    """Keeps checkpoints in memory, as the real one keeps them on disk: {"step", "data", "callbacks"}."""

    def __init__(self) -> None:
        self.saved: dict[int, dict[str, Any]] = {}
        self.saved_step: int | None = None

    def save(self, trainer: Trainer) -> Path | None:
        self.saved[trainer.step] = {"step": trainer.step, "data": trainer.module.state_dict(),
                                    "callbacks": trainer.callbacks.state_dict()}
        self.saved_step = trainer.step
        return Path(f"step{trainer.step}")

    def load(self, trainer: Trainer, point: Path) -> dict[str, Any]:
        self.saved_step = int(point.name.removeprefix("step"))
        return self.saved[self.saved_step]

    def latest(self) -> Path | None:
        return Path(f"step{max(self.saved)}") if self.saved else None


class SaveAt(Callback):
    name = "save_at"

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, trainer: Trainer, outcome: Any) -> None:
        if outcome.step == self.step:
            trainer.save()


def test_each_callbacks_state_is_saved_under_its_name_and_restored_before_train_start():
    saver = MemoryCheckpointer()
    Trainer(ToyModule(), 5, logging_steps=1, callbacks=[Recorder([]), SaveAt(3)], checkpointer=saver).fit()
    # Written once every callback had handled step 3, the recorder after the callback that asked for it too.
    assert saver.saved[3]["callbacks"] == {"recorder": {"seen": 3}}
    resumed_log: list = []
    module = ToyModule()
    recorder = Recorder(resumed_log)
    result = Trainer(module, 5, logging_steps=1, callbacks=[recorder], checkpointer=saver).fit(Path("step3"))
    assert module.position == 3 + 2 and result.steps == 5
    assert resumed_log[0] == ("start", 3) and recorder.seen == 3 + 2


def test_a_checkpoint_from_before_callbacks_restores_each_state_by_its_old_key():
    class Evaluation(Callback):
        name, legacy_state_keys = "evaluation", ("monitor",)
        state: dict | None = None

        def state_dict(self) -> dict:
            return {}

        def load_state_dict(self, state: dict) -> None:
            self.state = state

    callback = Evaluation()
    CallbackList([callback]).load_state_dict({"step": 4, "data": {}, "rng": {}, "monitor": {"best_loss": 2.5}})
    assert callback.state == {"best_loss": 2.5}


def test_a_rollback_restores_the_state_of_callbacks_that_ask_for_it_and_cuts_the_loss_history():
    class Health(Callback):
        name, restore_on_rollback = "health", False

        def __init__(self) -> None:
            self.rolled = 0

        def on_step_end(self, trainer: Trainer, outcome: Any) -> None:
            if outcome.output.verdict is not None and outcome.output.verdict.rollback and not self.rolled:
                outcome.discard()
                self.rolled += 1
                trainer.restore(trainer.checkpointer.latest(), rollback=True)

        def state_dict(self) -> dict:
            return {"rolled": self.rolled}

        def load_state_dict(self, state: dict) -> None:
            self.rolled = state["rolled"]

    saver, module, health, recorder = MemoryCheckpointer(), ToyModule(rollback_at=4), Health(), Recorder([])
    result = Trainer(module, 6, logging_steps=1, callbacks=[health, SaveAt(2), recorder], checkpointer=saver).fit()
    assert health.rolled == 1  # its own count survives the rollback (restore_on_rollback = False)
    # Steps 1-2 (the checkpoint), 3 (lost with the rollback from step 4), then 3-6 again: step 4 only once, the
    # second time (the module asks for one rollback only).
    assert recorder.seen == 2 + 4
    assert module.position == 8  # the data went on: 4 batches before the rollback, 4 after (it is not rewound)
    assert result.steps == 6 and len(result.losses) == 6


def test_callbacks_with_state_need_unique_names():
    with pytest.raises(ValueError, match="recorder"):
        CallbackList([Recorder([]), Recorder([])])
