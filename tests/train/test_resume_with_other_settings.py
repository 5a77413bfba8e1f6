"""A resume that changes the run's length keeps the LR decay horizon; one that changes the held-out set says so
and restarts the best-loss record. Both on the real callbacks, driven by the Trainer with a toy module."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from ava.train.callbacks.evaluation import Evaluation
from ava.train.callbacks.lr_horizon import LRHorizon
from ava.train.engine.lr_schedule import LRSchedule
from ava.train.trainer import Callback, StepOutput, Trainer


def _schedule(total: int) -> LRSchedule:
    return LRSchedule(peak=1e-3, end=1e-4, warmup_steps=5, total_steps=total)


class Steps:
    """Logs the LR its optimizer's schedule gives each step, as the real module does (`opt.updates = step - 1`)."""

    tokens_per_step, flops_per_token = 0, 0.0

    def __init__(self, total: int, eval_loss: float = 2.0) -> None:
        self.optimizer = SimpleNamespace(schedule=_schedule(total))
        self.eval_loss = eval_loss

    @property
    def engines(self) -> dict[str, Any]:
        return {}

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def train_step(self, step: int, logs: bool, before_update: Any) -> StepOutput:
        loss = torch.tensor(1.0)
        return StepOutput(loss, loss, record={"loss": 1.0, "lr": self.optimizer.schedule.lr(step - 1)})

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def evaluate(self) -> float:
        return self.eval_loss

    def sample(self, max_new_tokens: int) -> None:
        return None


class Memory:
    """A checkpointer that keeps each step's state in memory."""

    def __init__(self) -> None:
        self.saved: dict[int, dict[str, Any]] = {}

    def save(self, trainer: Trainer) -> Path:
        self.saved[trainer.step] = {"step": trainer.step, "data": {}, "callbacks": trainer.callbacks.state_dict()}
        return Path(f"step{trainer.step}")

    def load(self, trainer: Trainer, point: Path) -> dict[str, Any]:
        return self.saved[int(point.name.removeprefix("step"))]


class SaveAtEnd(Callback):
    def on_step_end(self, trainer: Trainer, outcome: Any) -> None:
        if outcome.step == trainer.planned_steps:
            trainer.save()


class Records(Callback):
    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def on_log(self, trainer: Trainer, record: dict[str, Any]) -> None:
        self.records.append(dict(record))


def _run(steps: Steps, planned: int, memory: Memory, *callbacks: Callback, resume_at: int | None = None) -> list[dict]:
    records = Records()
    Trainer(steps, planned, logging_steps=1, callbacks=[*callbacks, SaveAtEnd(), records],
            checkpointer=memory).fit(Path(f"step{resume_at}") if resume_at is not None else None)
    return records.records


def _horizon(steps: Steps) -> LRHorizon:
    return LRHorizon(steps.optimizer, _schedule)  # type: ignore[arg-type]


def test_a_resume_with_more_steps_keeps_the_decay_horizon_and_says_so():
    memory = Memory()
    first = Steps(30)
    before = _run(first, 30, memory, _horizon(first))
    assert memory.saved[30]["callbacks"]["lr_schedule"] == {"total_steps": 30}
    longer = Steps(40)
    after = _run(longer, 40, memory, _horizon(longer), resume_at=30)
    lrs = {r["step"]: r["lr"] for r in after if "lr" in r}
    assert sorted(lrs) == list(range(31, 41)) and set(lrs.values()) == {1e-4}  # on at lr_end, no jump back up
    assert before[-1]["lr"] > 1e-4 and abs(before[-1]["lr"] - 1e-4) < 1e-5  # the end of the original decay
    events = [r for r in after if r.get("event") == "lr_schedule_kept"]
    assert len(events) == 1 and events[0]["step"] == 30
    assert "decay over 30 steps, not the 40 now planned" in events[0]["reason"]
    assert longer.optimizer.schedule == _schedule(30)


def test_a_resume_with_the_same_length_changes_nothing():
    memory = Memory()
    first = Steps(30)
    _run(first, 20, memory, _horizon(first))  # stopped at step 20 of a 30-step schedule
    again = Steps(30)
    after = _run(again, 30, memory, _horizon(again), resume_at=20)
    assert not [r for r in after if "event" in r]
    assert [r["lr"] for r in after if "lr" in r] == [_schedule(30).lr(s) for s in range(20, 30)]


def test_evaluation_records_name_their_held_out_set_and_a_changed_set_restarts_the_best():
    memory = Memory()
    first = _run(Steps(20, eval_loss=1.0), 10, memory, Evaluation(5, None, 0.0, held_out="a" * 32))
    assert [r["held_out"] for r in first if "eval_loss" in r] == ["a" * 32] * 2
    assert memory.saved[10]["callbacks"]["evaluation"]["held_out"] == "a" * 32

    same = Evaluation(5, None, 0.0, held_out="a" * 32)
    kept = _run(Steps(20, eval_loss=3.0), 20, memory, same, resume_at=10)
    assert not [r for r in kept if "event" in r] and same.monitor.best_step == 5  # 3.0 is worse than 1.0

    other = Evaluation(5, None, 0.0, held_out="b" * 32)
    changed = _run(Steps(20, eval_loss=3.0), 20, memory, other, resume_at=10)
    events = [r for r in changed if r.get("event") == "held_out_changed"]
    assert len(events) == 1 and "aaaaaaaaaaaa -> bbbbbbbbbbbb" in events[0]["reason"]
    assert other.monitor.best_step == 15 and other.monitor.best_loss == 3.0  # the first loss on the new set
    assert [r["held_out"] for r in changed if "eval_loss" in r] == ["b" * 32] * 2
