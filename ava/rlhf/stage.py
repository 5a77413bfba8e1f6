"""What every RLHF stage shares: its environment, its optimizer steps, the Trainer it runs on, what it reports.

A stage gets a `StageEnv` (config, ranks, tokenizer, task, where to write,
where to log, the stop-signal flag, the checkpoint to resume from) and
returns a `StageResult`. Each stage is a `StageSteps` module run by the same
`Trainer` as pre-training (`ava.train.trainer`), with the same callbacks:
held-out evaluation before and after, in-stage checkpoints
(`rlhf.<stage>.save_steps`), and a stop signal -> checkpoint -> exit for
requeue, after which `--resume` continues inside the stage. Each trained
engine steps through an `Updater`, the shared `OptimizerStep` (LR, clip, the
gradient-health gate, router biases) plus what RLHF adds: health events
labelled with the stage and role, and too many bad updates in a row stop the
stage with the reason (an RLHF stage does not roll back).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ava.config.schema import AvaConfig
from ava.data.tokenizer import Tokenizer
from ava.rlhf.engines import RoleEngine
from ava.rlhf.tasks import Task
from ava.train.callbacks.checkpointing import Checkpointing
from ava.train.callbacks.preemption import Preemption
from ava.train.callbacks.records import Records
from ava.train.checkpoint.checkpointer import Checkpointer
from ava.train.engine.gradient_health import HealthMonitor
from ava.train.engine.lr_schedule import LRSchedule
from ava.train.engine.optimizer_step import OptimizerStep
from ava.train.runtime.distributed import ProcessInfo
from ava.train.runtime.faults import FaultPlan
from ava.train.runtime.preemption import PreemptionFlag
from ava.train.trainer.callback import Callback
from ava.train.trainer.trainer import StepOutput, Trainer, TrainResult

if TYPE_CHECKING:
    from collections.abc import Mapping


class StageFailed(Exception):
    """A stage cannot go on (repeated bad updates); the message says why and what to change."""


@dataclass
class StageEnv:
    config: AvaConfig
    process: ProcessInfo
    tokenizer: Tokenizer
    task: Task | None
    out_dir: Path  # this stage's directory
    seed: int
    log: Callable[[dict], None]  # a record for metrics.jsonl and the console (rank 0 writes)
    note: Callable[[str], None]
    preemption: PreemptionFlag | None = None  # a stop signal checkpoints the stage and ends it "preempted"
    resume_from: Path | None = None  # an in-stage checkpoint to continue from
    faults: FaultPlan | None = None  # injected faults, for tests: process faults at a step start, checkpoint faults

    @property
    def rlhf(self) -> Any:
        assert self.config.rlhf is not None
        return self.config.rlhf

    def zero_stage(self, role: str) -> int:
        chosen = getattr(self.rlhf.zero_stage, role)
        return self.config.deepspeed.zero_stage if chosen is None else int(chosen)

    def sum_over_ranks(self, values: torch.Tensor) -> torch.Tensor:
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            values = values.clone()
            torch.distributed.all_reduce(values)
        return values

    def mean_over_ranks(self, values: dict[str, float], device: torch.device) -> dict[str, float]:
        """Average scalar metrics over ranks (one collective), so a record describes the global batch."""
        if not values:
            return {}
        keys = list(values)
        total = self.sum_over_ranks(torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device))
        return dict(zip(keys, (total / self.process.world_size).tolist(), strict=True))


@dataclass
class StageResult:
    stage: str
    status: str = "completed"  # or "failed", "preempted"
    steps: int = 0
    model_dir: Path | None = None
    seconds: float = 0.0
    summary: dict[str, Any] = field(default_factory=dict)  # the stage's headline numbers
    failure: str | None = None
    health: dict[str, Any] | None = None


class Updater:
    """The updates of one trained engine: the shared `OptimizerStep` on a constant LR after warmup."""

    def __init__(self, role: RoleEngine, env: StageEnv, peak_lr: float, warmup_steps: int, total_updates: int,
                 stage: str) -> None:
        self.role, self.env, self.stage = role, env, stage
        schedule = LRSchedule(peak=peak_lr, end=peak_lr, warmup_steps=min(warmup_steps, total_updates),
                              total_steps=max(total_updates, 1), decay="constant")
        health = env.config.training.gradient_health
        mode = env.rlhf.gradient_health
        if mode == "nonfinite":  # never call a norm an explosion: only NaN/Inf skip an update
            health = health.model_copy(update={"explosion_threshold": math.inf})
        self.health = HealthMonitor(health) if health.enabled and mode != "off" else None
        rate = role.model_config.router_bias_update_rate if role.collects_loads else None
        self.optimizer = OptimizerStep(role.engine, schedule, self.health, rate)
        self.skipped = 0
        self.last_grad_norm: float | None = None
        self.events: list[dict[str, Any]] = []  # health interventions since the stage last took them

    @property
    def last_lr(self) -> float:
        """The LR the last update used (what a log record shows)."""
        return self.optimizer.lr

    def step(self, loss: torch.Tensor) -> bool:
        """Backward `loss` and take one optimizer step; False when the health gate skipped the update."""
        loads, self.role.pending_loads = self.role.pending_loads, []
        verdict = self.optimizer.update(loss, loads)
        self.last_grad_norm = self.optimizer.read_grad_norm()
        if verdict is None or self.health is None:
            return True
        for event in self.health.drain_events():
            self.events.append({**event, "stage": self.stage, "role": self.role.role, "update": event["step"]})
        if not verdict.apply:
            self.skipped += 1
        if verdict.rollback:
            limit = self.env.config.training.gradient_health.max_consecutive_bad_steps
            raise StageFailed(f"{self.stage}: {limit} bad {self.role.role} updates in a row (NaN/Inf or exploding "
                              "gradients). Lower the stage's learning_rate, or raise "
                              "training.gradient_health.explosion_threshold if the norms are legitimately large")
        return verdict.apply

    def state_dict(self) -> dict[str, Any]:
        return {"role": self.role.role, "updates": self.optimizer.updates, "lr": self.optimizer.lr, "skipped": self.skipped,
                "last_grad_norm": self.last_grad_norm,
                "health": self.health.state_dict() if self.health is not None else None}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.optimizer.updates, self.optimizer.lr = int(state["updates"]), float(state["lr"])
        self.skipped, self.last_grad_norm = int(state["skipped"]), state["last_grad_norm"]
        if self.health is not None and state["health"] is not None:
            self.health.load_state_dict(state["health"])


class StageSteps:
    """An RLHF stage as a `TrainModule`: `step()` is one stage step; subclasses add their own state.

    The engines a checkpoint saves are the trained ones (the frozen reference
    and reward model are rebuilt from the stage's starting model on resume).
    """

    stage = "stage"
    tokens_per_step = 0  # no throughput in the records (an RL step's tokens are generated, not read)
    flops_per_token = 0.0

    def __init__(self, env: StageEnv, updaters: list[Updater]) -> None:
        self.env, self.updaters = env, updaters

    @property
    def engines(self) -> dict[str, Any]:
        return {u.role.role: u.role.engine for u in self.updaters}

    @property
    def device(self) -> torch.device:
        return self.updaters[0].role.device

    def train_step(self, step: int, logs: bool, before_update: Callable[[], None]) -> StepOutput:
        if self.env.faults is not None:
            self.env.faults.at_step(step, self.env.process.rank)
        try:
            record = self.step(step, logs)
        except StageFailed:  # the health events that explain why go out before the failure does
            for event in self._take_events():
                self.env.log(event)
            raise
        return StepOutput(record={"stage": self.stage, **record} if record is not None else None,
                          events=self._take_events())

    def _take_events(self) -> list[dict[str, Any]]:
        events = [e for u in self.updaters for e in u.events]
        for u in self.updaters:
            u.events = []
        return events

    def step(self, step: int, logs: bool) -> dict[str, Any] | None:
        """Run stage step `step`; on logging steps return its record (without "stage" and "step")."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {"updaters": [u.state_dict() for u in self.updaters], **self.extra_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for updater, saved in zip(self.updaters, state["updaters"], strict=True):
            updater.load_state_dict(saved)
        self.load_extra_state(state)

    def extra_state(self) -> dict[str, Any]:
        """The stage's own state a resume continues from (its data position, RNG streams, running statistics)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    def health(self) -> dict[str, Any] | None:
        """The gradient-health summary of the stage's trained engines (one engine: its summary alone)."""
        summaries = {u.role.role: u.health.summary() if u.health else None for u in self.updaters}
        return next(iter(summaries.values())) if len(summaries) == 1 else summaries


class StageEvaluation(Callback):
    """Held-out evaluation before the stage's first step (logged at step 0) and after its last.

    The "before" numbers travel in checkpoints, so a resumed stage still
    reports how far it moved from where it started.
    """

    name = "stage_evaluation"

    def __init__(self, stage: str, evaluate: Callable[[], dict[str, Any]]) -> None:
        self.stage, self.evaluate = stage, evaluate
        self.before: dict[str, Any] = {}
        self.after: dict[str, Any] = {}

    def state_dict(self) -> dict[str, Any]:
        return {"before": self.before}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.before = dict(state["before"])

    def on_train_start(self, trainer: Trainer) -> None:
        if not trainer.resumed:
            self.before = self.evaluate()
            trainer.log({"stage": self.stage, "step": 0, **self.before})

    def on_train_end(self, trainer: Trainer) -> None:
        if trainer.result.status == "preempted":
            return
        self.after = self.evaluate()
        trainer.log({"stage": self.stage, "step": trainer.planned_steps, **self.after})


def fit_stage(env: StageEnv, module: StageSteps, steps: int, logging_steps: int,
              evaluate: Callable[[], dict[str, Any]]) -> tuple[TrainResult, StageEvaluation]:
    """Run `module` for `steps` stage steps on the Trainer, with the stage's callbacks; resumes from `env.resume_from`."""
    evaluation = StageEvaluation(module.stage, evaluate)
    save_steps = getattr(env.rlhf, module.stage).save_steps or 0
    keep_last = env.config.training.keep_last_checkpoints
    callbacks: list[Callback] = [
        evaluation,
        Checkpointing(save_steps, saves_at_end=False, save_best=False, keep_last=keep_last, verify_reload=False)]
    if env.preemption is not None:
        callbacks.append(Preemption(env.preemption))
    stage = module.stage
    callbacks.append(Records(lambda record: env.log(record if "stage" in record else {**record, "stage": stage})))
    trainer = Trainer(module, steps, logging_steps=logging_steps, callbacks=callbacks,
                      checkpointer=Checkpointer(env.out_dir / "checkpoints", env.process.rank, keep_last, env.faults),
                      rank=env.process.rank)
    return trainer.fit(env.resume_from), evaluation


class Timer:
    """Seconds spent in each phase of a stage (generation vs training), for the time-share metric."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = {}

    def phase(self, name: str) -> _Phase:
        return _Phase(self, name)

    def state_dict(self) -> dict[str, float]:
        return dict(self.totals)

    def load_state_dict(self, state: Mapping[str, float]) -> None:
        self.totals = {k: float(v) for k, v in state.items()}


class _Phase:
    def __init__(self, timer: Timer, name: str) -> None:
        self.timer, self.name = timer, name

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.timer.totals[self.name] = self.timer.totals.get(self.name, 0.0) + time.perf_counter() - self.start


@dataclass
class RolloutRandomness:
    """Where a rank's randomness in an RL stage comes from: prompts, sampling, mini-batch order.

    Seeded by the run seed and the rank, so ranks draw different prompts and
    samples and a rerun draws the same ones.
    """

    prompts: random.Random
    sampling: torch.Generator
    shuffle: torch.Generator

    @classmethod
    def for_rank(cls, seed: int, rank: int, device: torch.device, stage: str) -> RolloutRandomness:
        """Differs by rank and by stage (PPO and GRPO in one pipeline draw different prompts)."""
        salt = sum(ord(c) * 31 ** i for i, c in enumerate(stage)) % 1000  # stable across runs, unlike hash()
        base = (seed * 1000 + salt) * 1000003 + rank
        return cls(random.Random(base), torch.Generator(device=device).manual_seed(base),
                   torch.Generator().manual_seed(base + 1))

    def state_dict(self) -> dict[str, Any]:
        """Where each stream stands: a resumed stage draws exactly what the uninterrupted one would have."""
        return {"prompts": self.prompts.getstate(), "sampling": self.sampling.get_state(),
                "shuffle": self.shuffle.get_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        version, internal, gauss = state["prompts"]
        self.prompts.setstate((version, tuple(internal), gauss))
        self.sampling.set_state(state["sampling"])
        self.shuffle.set_state(state["shuffle"])


def reward_curve_summary(rewards_per_step: list[float], timer: Timer, before: dict, after: dict) -> dict[str, Any]:
    """An RL stage's headline numbers: the rollout reward at its start and end, time shares, held-out evals."""
    tenth = max(1, len(rewards_per_step) // 10)
    spent = sum(timer.totals.values()) or 1.0
    return {"reward_first_10pct": sum(rewards_per_step[:tenth]) / tenth,
            "reward_last_10pct": sum(rewards_per_step[-tenth:]) / tenth, "reward_per_step": rewards_per_step,
            "time_share": {k: v / spent for k, v in timer.totals.items()},
            **{f"before/{k}": v for k, v in before.items() if k != "eval_samples"},
            **{f"after/{k}": v for k, v in after.items() if k != "eval_samples"},
            "samples": after.get("eval_samples", [])}


def stage_lr(env: StageEnv, stage_cfg: Any) -> float:
    lr = stage_cfg.learning_rate
    return float(env.config.training.learning_rate if lr is None else lr)

