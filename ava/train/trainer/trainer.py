"""The Trainer: a short fit loop over a `TrainModule`, with every optional behaviour a callback.

The loop only counts steps, asks the module for each optimizer step, logs
what the module reports on logging steps (with the throughput), and hands
each step's outcome to the callbacks (`ava.train.trainer.callback`), which
evaluate, checkpoint, roll back, watch for a stop signal and stop early.
A callback ends the run through `stop()` and asks for a checkpoint through
`save()`, written once every callback has handled the step (so each one's
state in it is the same step's); `restore()` loads one. Both go through the
run's `Checkpointer`.

What a step *is* belongs to the module: a pre-training step over several
micro batches (`ava.train.lm`), or an RLHF stage's rollout and updates
(`ava.rlhf`). Both step their engines through `ava.train.engine.optimizer_step`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import torch

from ava.train.engine.gradient_health import Verdict
from ava.train.trainer.callback import Callback, CallbackList

# When several callbacks stop the run at one step, the gravest reason is the one reported.
_STOP_PRIORITY = {"completed": 0, "early_stopped": 1, "preempted": 2, "failed": 3}


@dataclass
class StepOutput:
    """What one optimizer step of a module produced.

    Losses stay device tensors (no host sync per step); `record` is filled on
    logging steps only; `events` (health interventions) are logged before it.
    """

    loss: torch.Tensor | None = None  # the step's loss over the global batch's share of this rank
    lm_loss: torch.Tensor | None = None  # its language-model part (what evaluation measures)
    verdict: Verdict | None = None  # the gradient-health gate's decision, when the monitor is on
    record: dict[str, Any] | None = None
    events: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class StepOutcome:
    """A finished step as the callbacks see it; a callback may `discard()` it (a rollback)."""

    step: int
    output: StepOutput
    discarded: bool = False

    @property
    def update_applied(self) -> bool:
        """False when the health gate skipped this step's update (its weights are the previous step's)."""
        return self.output.verdict is None or self.output.verdict.apply

    def discard(self) -> None:
        """This step's results are gone (rolled back): the callbacks after this one do not see it."""
        self.discarded = True


class TrainModule(Protocol):
    """What the trainer drives: the engines to checkpoint and one optimizer step at a time."""

    @property
    def engines(self) -> Mapping[str, Any]: ...  # DeepSpeed engines a checkpoint saves, by name

    @property
    def device(self) -> torch.device: ...

    tokens_per_step: int  # tokens one step trains on, all ranks (0: no throughput in the records)
    flops_per_token: float  # training FLOPs per token (for MFU)

    def train_step(self, step: int, logs: bool, before_update: Callable[[], None]) -> StepOutput: ...

    def state_dict(self) -> dict[str, Any]: ...  # its data position (and RNG streams of its own)

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class TrainResult:
    """What a finished run reports; the trainer fills the counts, callbacks the parts they own."""

    steps: int  # optimizer steps completed (fewer than planned when stopped early)
    planned_steps: int = 0
    start_step: int = 0  # the checkpoint's step a resumed run continued from; losses and tokens cover the rest
    # or "early_stopped", "preempted" (a stop signal: checkpointed), "failed" (unrecoverable gradient health)
    status: str = "completed"
    failure: str | None = None  # why the run failed
    losses: list[float] = field(default_factory=list)  # global-batch loss of every step this process ran
    eval_loss: float | None = None  # the last evaluation
    best_eval_loss: float | None = None
    best_step: int | None = None
    evaluations: int = 0
    tokens: int = 0
    seconds: float = 0.0
    first_step_seconds: float = 0.0
    checkpoint: Path | None = None  # the final checkpoint
    checkpoint_reload_ok: bool | None = None  # the final checkpoint reloaded and gave the same loss
    sample: tuple[list[int], list[int]] | None = None  # (prompt ids, generated ids)
    model: Any = field(default=None, repr=False)  # the trained module (for export)
    precision: Any = None  # PrecisionReport
    health: dict[str, Any] | None = None  # the gradient-health monitor's interventions
    parameters: Any = None  # ParameterReport: total / trainable / LoRA counts
    lora_scaling: float | None = None  # alpha / r when LoRA adapters were trained (export merges them)
    warnings: list[str] = field(default_factory=list)  # configuration warnings raised while setting up


class LossHistory:
    """Every step's losses as device tensors, in order; a rollback cuts it back to the step it returns to.

    Each entry has a sequence number that never repeats, so "the steps since
    mark m" stays right across a rollback (steps run again come after it).
    """

    def __init__(self) -> None:
        self.steps: list[int] = []
        self.losses: list[torch.Tensor] = []
        self.lm_losses: list[torch.Tensor] = []
        self._ids: list[int] = []
        self._next = 0

    def append(self, step: int, loss: torch.Tensor, lm_loss: torch.Tensor | None) -> None:
        self.steps.append(step)
        self.losses.append(loss)
        self.lm_losses.append(loss if lm_loss is None else lm_loss)
        self._ids.append(self._next)
        self._next += 1

    def mark(self) -> int:
        """A position to ask `lm_losses_since` about later."""
        return self._next

    def lm_losses_since(self, mark: int) -> list[torch.Tensor]:
        return [v for i, v in zip(self._ids, self.lm_losses, strict=True) if i >= mark]

    def truncate_after(self, step: int) -> None:
        keep = sum(s <= step for s in self.steps)
        for column in (self.steps, self.losses, self.lm_losses, self._ids):
            del column[keep:]


def mean_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """Average a tensor over the data-parallel ranks (one collective)."""
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        values = values.clone()
        torch.distributed.all_reduce(values)
        values /= torch.distributed.get_world_size()
    return values


class Trainer:
    """Runs `module` for `planned_steps` optimizer steps, calling `callbacks` (see the module docstring)."""

    def __init__(self, module: TrainModule, planned_steps: int, *, logging_steps: int,
                 callbacks: Iterable[Callback] = (), checkpointer: Any = None, rank: int = 0,
                 started: float | None = None) -> None:
        self.module, self.checkpointer, self.rank = module, checkpointer, rank
        self.callbacks = CallbackList(callbacks)
        self.logging_steps = logging_steps
        self.started = time.perf_counter() if started is None else started  # for the time to the first step
        self.step = self.start_step = 0
        self.planned_steps = planned_steps
        self.resumed = False
        self.stopping = False
        self.history = LossHistory()
        self.result = TrainResult(steps=0, planned_steps=planned_steps)
        self._stop_event: dict[str, Any] | None = None
        self._save_due = False
        self._not_training = 0.0  # seconds of evaluation and checkpointing since the last step record

    def logs(self, step: int) -> bool:
        """Whether `step` writes a step record."""
        return step % self.logging_steps == 0 or step == self.planned_steps

    def log(self, record: dict[str, Any]) -> None:
        """Hand a record to every callback (the sinks among them write it)."""
        self.callbacks.on_log(self, record)

    def stop(self, status: str, event: dict[str, Any] | None = None, failure: str | None = None) -> None:
        """End the run after this step with `status`; `event` is logged then. The gravest status wins.

        `status`: "early_stopped", "preempted" or "failed" (or "completed": stop here, nothing wrong).
        """
        if status not in _STOP_PRIORITY:
            raise ValueError(f"unknown stop status {status!r}: one of {', '.join(_STOP_PRIORITY)}")
        self.stopping = True
        if _STOP_PRIORITY[status] >= _STOP_PRIORITY[self.result.status]:
            self.result.status, self._stop_event = status, event
            self.result.failure = failure or self.result.failure

    def save(self) -> None:
        """Checkpoint this step once every callback has handled it (collective), unless the run keeps none."""
        self._save_due = self.checkpointer is not None

    @contextlib.contextmanager
    def not_training(self) -> Iterator[None]:
        """Time spent inside (an evaluation, say) is left out of the next step record's tokens/s."""
        began = time.perf_counter()
        try:
            yield
        finally:
            self._not_training += time.perf_counter() - began

    def _write_checkpoint(self) -> None:
        self._save_due = False
        with self.not_training():
            path = self.checkpointer.save(self)
        if path is not None:  # None: this step is saved already
            self.result.checkpoint = path
            self.callbacks.on_save(self, path)

    def restore(self, point: Path, rollback: bool = False) -> int:
        """Load checkpoint `point` into the engines and callbacks; a rollback keeps the data position going."""
        state = self.checkpointer.load(self, point)
        self._save_due = False  # a rolled-back step is not saved
        step = int(state["step"])
        if not rollback:
            self.module.load_state_dict(state["data"])
        self.callbacks.load_state_dict(state, rollback=rollback)
        self.step = self.result.steps = step
        self.history.truncate_after(step)
        return step

    def fit(self, resume_from: Path | None = None) -> TrainResult:
        """Train to `planned_steps` (or until a callback stops the run), from `resume_from` if given."""
        if resume_from is not None:
            self.start_step = self.result.start_step = self.restore(resume_from)
            self.resumed = True
            self.result.checkpoint = resume_from  # a resumed run that saves nothing new still has its checkpoint
        self.callbacks.on_train_start(self)
        if self.stopping and self._stop_event is not None:
            self.log(self._stop_event)
        # Wall-clock windows: on a GPU a step's kernels finish after its host code returns, so only the time
        # between records (less evaluation and checkpoints) counts what the steps really took.
        window_start, window_tokens = time.perf_counter(), 0
        while self.step < self.planned_steps and not self.stopping:
            self.step += 1
            step = self.step
            out = self.module.train_step(step, self.logs(step), partial(self.callbacks.before_update, self, step))
            if out.loss is not None:
                self.history.append(step, out.loss, out.lm_loss)
            window_tokens += self.module.tokens_per_step
            self.result.steps = step
            if step == self.start_step + 1:
                self.result.first_step_seconds = time.perf_counter() - self.started
            for event in out.events:
                self.log(event)
            if out.record is not None:
                seconds = time.perf_counter() - window_start - self._not_training
                self.log({"step": step, **self._speed(window_tokens, seconds), **out.record})
                window_start, window_tokens, self._not_training = time.perf_counter(), 0, 0.0
            self.callbacks.on_step_end(self, StepOutcome(step, out))
            if self._save_due:
                self._write_checkpoint()
            if self.stopping and self._stop_event is not None:
                self.log(self._stop_event)
        return self._finish()

    def _speed(self, tokens: int, seconds: float) -> dict[str, float]:
        if not tokens or seconds <= 0:
            return {}
        return {"tokens_per_s": tokens / seconds, "mfu_flops_per_s": self.module.flops_per_token * tokens / seconds}

    def _finish(self) -> TrainResult:
        result = self.result
        if self.history.losses:
            result.losses = mean_over_ranks(torch.stack(self.history.losses)).cpu().tolist()
        result.tokens = (result.steps - self.start_step) * self.module.tokens_per_step
        self.callbacks.on_train_end(self)
        result.seconds = time.perf_counter() - self.started
        return result
