"""The gradient-health policy: is this step's update safe to apply, and what to do when it is not.

Pure bookkeeping on host floats, so every rule can be tested on paper. The
DeepSpeed side (where the norm comes from, how an update is skipped, how the
clip value reaches the optimizer) is `ava.train.engine.update_gate`. Every rank
feeds the same global gradient norm, so every rank reaches the same verdict.

Rules, per optimizer step:
- a non-finite norm (NaN/Inf in the loss or any gradient) skips the update;
- after `baseline_warmup_steps` healthy steps, a norm above
  `explosion_threshold` x the baseline (EMA or median of recent healthy
  norms) is an explosion: the update is skipped and, with `auto_reduce_lr`,
  the LR is multiplied by `lr_reduction_factor` until `lr_cooldown_steps`
  healthy steps have passed (repeated explosions compound, down to
  factor**3);
- `max_consecutive_bad_steps` skipped steps in a row ask for a rollback to
  the last checkpoint (the PaLM remedy), at most `max_rollbacks` times.
The clip threshold anneals linearly from `initial_clip_value` to
`final_clip_value` over `warmup_steps`.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any

from ava.config.schema.training import GradientHealthConfig

MAX_COMPOUNDED_REDUCTIONS = 3


@dataclass(frozen=True)
class Verdict:
    """The decision for one optimizer step."""

    apply: bool  # apply the optimizer update
    kind: str  # "healthy", "nonfinite" or "explosion"
    rollback: bool = False  # too many bad steps in a row: go back to the last checkpoint


def _json_number(value: float) -> float | str:
    """metrics.jsonl stays strict JSON: NaN and Inf are written as strings."""
    return value if math.isfinite(value) else str(value)


class HealthMonitor:
    """Judges each step's gradient norm and keeps the policy state a resume must continue."""

    def __init__(self, config: GradientHealthConfig) -> None:
        self.config = config
        self._alpha = 2.0 / (config.baseline_window + 1)
        self._ema: float | None = None
        self._recent: deque[float] = deque(maxlen=config.baseline_window)
        self.healthy_seen = 0
        self.lr_scale = 1.0
        self.reductions = 0  # compounded reductions in the current cool-down
        self.cooldown_left = 0
        self.consecutive_bad = 0
        self.rollbacks = 0
        self.loss_mean: float | None = None
        self.loss_var = 0.0
        self.counts: Counter[str] = Counter()
        self.history: list[dict[str, Any]] = []  # every intervention, for the end-of-run table
        self._pending: list[dict[str, Any]] = []

    # -- the schedule -------------------------------------------------------------------------

    def clip_value(self, step: int) -> float:
        """The clip threshold for optimizer step `step` (1-based): linear from initial to final."""
        c = self.config
        if c.warmup_steps == 0:
            return c.final_clip_value
        fraction = min(1.0, (step - 1) / c.warmup_steps)
        return c.initial_clip_value + (c.final_clip_value - c.initial_clip_value) * fraction

    @property
    def baseline(self) -> float | None:
        if self.config.baseline == "median":
            return statistics.median(self._recent) if self._recent else None
        return self._ema

    @property
    def detecting(self) -> bool:
        """Explosion detection is armed once enough healthy norms make the baseline meaningful."""
        return self.healthy_seen >= self.config.baseline_warmup_steps

    # -- the verdict --------------------------------------------------------------------------

    def judge(self, step: int, grad_norm: float, loss: float | None = None) -> Verdict:
        """Decide step `step` from its pre-clip global gradient norm (and this rank's loss, for the record)."""
        c = self.config
        if loss is not None and math.isfinite(loss):
            self._track_loss(loss)
        baseline = self.baseline
        if not math.isfinite(grad_norm):
            kind = "nonfinite"
            what = "loss" if loss is not None and not math.isfinite(loss) else "gradients"
            self._event(step, "nonfinite_gradient", f"NaN/Inf in the {what} (gradient norm {grad_norm}): "
                        "update skipped, weights unchanged", grad_norm=_json_number(grad_norm),
                        rank_loss=None if loss is None else _json_number(loss))
        elif self.detecting and baseline is not None and grad_norm > c.explosion_threshold * baseline:
            kind = "explosion"
            self._event(step, "gradient_explosion",
                        f"gradient norm {grad_norm:.4g} is {grad_norm / baseline:.1f}x the baseline {baseline:.4g} "
                        f"(threshold {c.explosion_threshold}x): update skipped",
                        grad_norm=grad_norm, baseline=baseline)
            if c.auto_reduce_lr:
                self._reduce_lr(step)
        else:
            self._healthy(grad_norm)
            return Verdict(apply=True, kind="healthy")
        self.counts["skipped_steps"] += 1
        self.consecutive_bad += 1
        limit = c.max_consecutive_bad_steps
        return Verdict(apply=False, kind=kind, rollback=bool(limit) and self.consecutive_bad >= limit)

    def loss_scale_skip(self, step: int) -> Verdict:
        """fp16: DeepSpeed skipped the step to lower its loss scale. Routine calibration, not a bad step.

        Early in an fp16 run the dynamic loss scale overflows several times in a
        row by design; counting those would trigger rollbacks. A real NaN keeps
        overflowing until DeepSpeed's min_loss_scale, where DeepSpeed stops.
        """
        self.counts["loss_scale_skips"] += 1
        return Verdict(apply=False, kind="loss_scale")

    def _healthy(self, grad_norm: float) -> None:
        self.consecutive_bad = 0
        self.healthy_seen += 1
        self._recent.append(grad_norm)
        self._ema = grad_norm if self._ema is None else self._ema + self._alpha * (grad_norm - self._ema)

    def _track_loss(self, loss: float) -> None:
        if self.loss_mean is None:
            self.loss_mean = loss
            return
        delta = loss - self.loss_mean
        self.loss_mean += self._alpha * delta
        self.loss_var = (1 - self._alpha) * (self.loss_var + self._alpha * delta * delta)

    def _reduce_lr(self, step: int) -> None:
        c = self.config
        if self.reductions < MAX_COMPOUNDED_REDUCTIONS:
            self.reductions += 1
            self.lr_scale = c.lr_reduction_factor ** self.reductions
        self.cooldown_left = c.lr_cooldown_steps
        self._event(step, "lr_reduced", f"learning rate x{self.lr_scale:.3g} for the next {c.lr_cooldown_steps} "
                    "healthy steps", lr_scale=self.lr_scale)

    def end_step(self, step: int, verdict: Verdict) -> None:
        """Count down the cool-down after a healthy step; restore the full LR when it ends."""
        if verdict.kind != "healthy" or self.cooldown_left == 0:
            return
        self.cooldown_left -= 1
        if self.cooldown_left == 0:
            self.lr_scale, self.reductions = 1.0, 0
            self._event(step, "lr_restored", "cool-down over: learning rate back on its schedule", lr_scale=1.0)

    def rolled_back(self, step: int, to_step: int, skipped_batches: int) -> None:
        """Record a rollback; the batches of the abandoned steps are not trained on again."""
        self.rollbacks += 1
        self.consecutive_bad = 0
        self._event(step, "rollback", f"{self.config.max_consecutive_bad_steps} bad steps in a row: back to the "
                    f"checkpoint of step {to_step}, skipping the {skipped_batches} batches since",
                    to_step=to_step, skipped_batches=skipped_batches)
        if self.config.auto_reduce_lr:
            self._reduce_lr(step)

    @property
    def rollbacks_exhausted(self) -> bool:
        return self.rollbacks >= self.config.max_rollbacks

    # -- signals and events -------------------------------------------------------------------

    def signals(self) -> dict[str, float]:
        """Running statistics for a logging step."""
        out: dict[str, float] = {"lr_scale": self.lr_scale}
        if self.baseline is not None:
            out["grad_norm_baseline"] = self.baseline
        if self.loss_mean is not None:
            out["loss_ema"] = self.loss_mean
            out["loss_std"] = math.sqrt(self.loss_var)
        return out

    def _event(self, step: int, name: str, reason: str, **fields: Any) -> None:
        record = {"step": step, "event": name, "reason": reason, **fields}
        self.counts[name] += 1
        self.history.append(record)
        self._pending.append(record)

    def drain_events(self) -> list[dict[str, Any]]:
        """Events since the last call, for metrics.jsonl and the console."""
        events, self._pending = self._pending, []
        return events

    def summary(self) -> dict[str, Any]:
        """What the end-of-run table shows: counts by kind and the steps each happened at."""
        steps: dict[str, list[int]] = {}
        for record in self.history:
            steps.setdefault(record["event"], []).append(record["step"])
        return {"counts": dict(self.counts), "steps": steps, "lr_scale": self.lr_scale,
                "rollbacks": self.rollbacks}

    # -- checkpointing ------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"ema": self._ema, "recent": list(self._recent), "healthy_seen": self.healthy_seen,
                "lr_scale": self.lr_scale, "reductions": self.reductions, "cooldown_left": self.cooldown_left,
                "consecutive_bad": self.consecutive_bad, "rollbacks": self.rollbacks,
                "loss_mean": self.loss_mean, "loss_var": self.loss_var, "counts": dict(self.counts),
                "history": list(self.history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._ema = state["ema"]
        self._recent = deque(state["recent"], maxlen=self.config.baseline_window)
        self.healthy_seen, self.lr_scale = state["healthy_seen"], state["lr_scale"]
        self.reductions, self.cooldown_left = state["reductions"], state["cooldown_left"]
        self.consecutive_bad, self.rollbacks = state["consecutive_bad"], state["rollbacks"]
        self.loss_mean, self.loss_var = state["loss_mean"], state["loss_var"]
        self.counts = Counter(state["counts"])
        self.history = list(state["history"])
