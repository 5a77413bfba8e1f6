"""Held-out evaluation, the best-so-far record and early stopping, as a callback.

`EvalMonitor` is plain data with a `state_dict`, so it travels in every
checkpoint: a resumed run remembers its best loss and how many evaluations
have passed without improvement, and stops early at exactly the step the
uninterrupted run would have. Each evaluation record also carries the
train/validation gap: the mean training LM loss since the previous
evaluation (or the (re)start) against the held-out loss, like for like.

Each evaluation record names the held-out set it measured (`held_out`, the
fingerprint of the evaluation batches), and so does the state in every
checkpoint: losses on different sets cannot be compared, so a run resumed on
another held-out set (other data settings) restarts its best-loss record and
early-stopping count, with an event saying so, and the end-of-run fit verdict
refuses to compare across the change (`ava.train.report.fit_verdict`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch

from ava.train.report.perplexity import perplexity
from ava.train.trainer.callback import Callback
from ava.train.trainer.trainer import mean_over_ranks

if TYPE_CHECKING:
    from ava.train.trainer.trainer import StepOutcome, Trainer


@dataclass
class EvalMonitor:
    """Tracks the best evaluation loss and decides when to stop early.

    An evaluation improves on the best when it is lower by more than
    `threshold` (absolute, in nats). After `patience` evaluations in a row
    without improvement the run stops; `patience=None` never stops.
    """

    patience: int | None
    threshold: float
    best_loss: float = math.inf
    best_step: int | None = None
    evals_without_improvement: int = 0

    def update(self, step: int, loss: float) -> bool:
        """Record the evaluation at `step`; True when it is the new best."""
        improved = math.isfinite(loss) and loss < self.best_loss - self.threshold
        if improved or (self.best_step is None and math.isfinite(loss)):
            self.best_loss, self.best_step, self.evals_without_improvement = loss, step, 0
            return True
        self.evals_without_improvement += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.evals_without_improvement >= max(self.patience, 1)

    def state_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k not in ("patience", "threshold")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_loss = float(state["best_loss"])
        self.best_step = state["best_step"]
        self.evals_without_improvement = int(state["evals_without_improvement"])


@dataclass(frozen=True)
class Evaluated:
    """What `on_evaluate` hands the other callbacks."""

    step: int
    loss: float
    improved: bool  # a new best


class Evaluation(Callback):
    """Evaluates every `every` steps and at the last one; stops the run after `patience` evaluations without gain.

    The trainer's module must offer `evaluate()` (the held-out loss) and
    `sample(max_new_tokens)`; the run ends with a greedy sample from a
    held-out prompt.
    """

    name = "evaluation"
    legacy_state_keys = ("monitor",)

    def __init__(self, every: int, patience: int | None, threshold: float, sample_tokens: int = 0,
                 held_out: str | None = None) -> None:
        self.every, self.sample_tokens, self.held_out = every, sample_tokens, held_out
        self.monitor = EvalMonitor(patience, threshold)
        self._since = 0  # the loss-history mark of the previous evaluation (or the (re)start)
        self._restored_held_out: str | None = None  # the held-out fingerprint of the checkpoint resumed from

    def state_dict(self) -> dict[str, Any]:
        state = self.monitor.state_dict()
        return {**state, "held_out": self.held_out} if self.held_out is not None else state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.monitor.load_state_dict(state)
        self._restored_held_out = state.get("held_out")

    def on_train_start(self, trainer: Trainer) -> None:
        self._since = trainer.history.mark()
        before, now = self._restored_held_out, self.held_out
        if trainer.resumed and before is not None and now is not None and before != now:
            m = self.monitor
            best = f"{m.best_loss:.4f} at step {m.best_step}" if m.best_step is not None else "none yet"
            trainer.log({"step": trainer.step, "event": "held_out_changed", "reason": (
                f"the held-out set differs from the checkpoint's (fingerprint {before[:12]} -> {now[:12]}: other "
                f"data settings), so its best evaluation loss ({best}) is not comparable: the best-loss record "
                "and early stopping start again, and the fit verdict will not compare across the change")})
            m.best_loss, m.best_step, m.evals_without_improvement = math.inf, None, 0
        if trainer.resumed and (trainer.step >= trainer.planned_steps or self.monitor.should_stop):
            # Training had ended (all steps, or early stopping) before the process stopped, e.g. killed while
            # exporting: finish from the final checkpoint instead of training on or reporting it unevaluated.
            trainer.result.eval_loss = trainer.module.evaluate()  # type: ignore[attr-defined]
            trainer.result.evaluations += 1
            if trainer.step < trainer.planned_steps:
                trainer.stop("early_stopped")

    def on_step_end(self, trainer: Trainer, outcome: StepOutcome) -> None:
        step = outcome.step
        if not self.every or (step % self.every and step != trainer.planned_steps):
            return
        with trainer.not_training():
            loss = trainer.module.evaluate()  # type: ignore[attr-defined]
        trainer.result.eval_loss = loss
        trainer.result.evaluations += 1
        improved = self.monitor.update(step, loss)
        record = {"step": step, "eval_loss": loss, "eval_perplexity": perplexity(loss),
                  "best_eval_loss": self.monitor.best_loss}
        if self.held_out is not None:
            record["held_out"] = self.held_out
        recent = trainer.history.lm_losses_since(self._since)
        if recent:  # the train/validation gap, over the steps since the previous evaluation (or the (re)start)
            train_loss = float(mean_over_ranks(torch.stack(recent).mean()))
            record.update(train_loss=train_loss, train_val_gap=loss - train_loss)
        self._since = trainer.history.mark()
        trainer.log(record)
        trainer.callbacks.on_evaluate(trainer, Evaluated(step, loss, improved))
        if self.monitor.should_stop:
            m = self.monitor
            trainer.stop("early_stopped", {
                "step": step, "event": "early_stop",
                "reason": f"{m.evals_without_improvement} evaluations without an improvement of more than "
                          f"{m.threshold} on the best eval loss {m.best_loss:.4f} (step {m.best_step})"})

    def on_train_end(self, trainer: Trainer) -> None:
        m = self.monitor
        trainer.result.best_eval_loss = m.best_loss if m.best_step is not None else None
        trainer.result.best_step = m.best_step
        trainer.result.sample = trainer.module.sample(self.sample_tokens)  # type: ignore[attr-defined]
