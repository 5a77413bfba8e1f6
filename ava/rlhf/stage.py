"""What every RLHF stage shares: its environment, its optimizer steps, and what it reports.

A stage gets a `StageEnv` (config, ranks, tokenizer, task, where to write,
where to log) and returns a `StageResult`. Each trained engine steps through
an `Updater`: the stage's LR schedule and the gradient-health gate, so a NaN
or an exploding PPO update is skipped under every ZeRO stage as in
pre-training; an RLHF stage has no checkpoints to roll back to, so too many
bad updates in a row stop the stage with the reason.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ava.config.schema import AvaConfig
from ava.data.tokenizer import Tokenizer
from ava.rlhf.engines import RoleEngine
from ava.rlhf.tasks import Task
from ava.train.engine.gradient_health import HealthMonitor
from ava.train.engine.lr_schedule import LRSchedule
from ava.train.engine.router_balance import balance_router_biases
from ava.train.engine.update_gate import UpdateGate, set_clip, set_lr
from ava.train.runtime.distributed import ProcessInfo


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
    status: str = "completed"  # or "failed"
    steps: int = 0
    model_dir: Path | None = None
    seconds: float = 0.0
    summary: dict[str, Any] = field(default_factory=dict)  # the stage's headline numbers
    failure: str | None = None
    health: dict[str, Any] | None = None


class Updater:
    """Optimizer steps of one trained engine: LR schedule, clip schedule and the gradient-health gate."""

    def __init__(self, role: RoleEngine, env: StageEnv, peak_lr: float, warmup_steps: int, total_updates: int,
                 stage: str) -> None:
        self.role, self.env, self.stage = role, env, stage
        self.schedule = LRSchedule(peak=peak_lr, end=peak_lr, warmup_steps=min(warmup_steps, total_updates),
                                   total_steps=max(total_updates, 1), decay="constant")
        health = env.config.training.gradient_health
        mode = env.rlhf.gradient_health
        if mode == "nonfinite":  # never call a norm an explosion: only NaN/Inf skip an update
            health = health.model_copy(update={"explosion_threshold": math.inf})
        self.health = HealthMonitor(health) if health.enabled and mode != "off" else None
        self.gate = UpdateGate(role.engine, self.health) if self.health is not None else None
        self.updates = 0
        self.skipped = 0
        self.balances = role.collects_loads  # the same on every rank: the collective stays matched
        self.last_grad_norm: float | None = None
        self.last_lr = 0.0  # the LR the last update used (what a log record shows)

    @property
    def lr(self) -> float:
        """The LR of the next update (the schedule is 0-based, as in pre-training)."""
        return self.schedule.lr(self.updates) * (self.health.lr_scale if self.health else 1.0)

    def step(self, loss: torch.Tensor) -> bool:
        """Backward `loss` and take one optimizer step; False when the health gate skipped the update."""
        engine = self.role.engine
        self.last_lr = self.lr
        set_lr(engine, self.last_lr)
        self.updates += 1
        if self.health is not None:
            set_clip(engine, self.health.clip_value(self.updates))
        engine.backward(loss)
        if self.gate is not None:
            self.gate.begin(self.updates, loss.detach().float(), measure_update=False)
        engine.step()
        loads, self.role.pending_loads = self.role.pending_loads, []
        if self.gate is None or self.health is None:
            norm = engine.get_global_grad_norm()
            self.last_grad_norm = float(norm) if norm is not None else None
            self._balance(loads)
            return True
        verdict = self.gate.finish()
        self.last_grad_norm = self.gate.grad_norm
        self.health.end_step(self.updates, verdict)
        for event in self.health.drain_events():
            self.env.log({**event, "stage": self.stage, "role": self.role.role, "update": event["step"]})
        if verdict.apply:
            self._balance(loads)
        else:
            self.skipped += 1
        if verdict.rollback:
            limit = self.env.config.training.gradient_health.max_consecutive_bad_steps
            raise StageFailed(f"{self.stage}: {limit} bad {self.role.role} updates in a row (NaN/Inf or exploding "
                              "gradients). Lower the stage's learning_rate, or raise "
                              "training.gradient_health.explosion_threshold if the norms are legitimately large")
        return verdict.apply


    def _balance(self, loads: list[torch.Tensor]) -> None:
        if self.balances:
            balance_router_biases(self.role.module, loads, self.role.model_config.router_bias_update_rate)


def check_finite(name: str, value: float) -> float:
    if not math.isfinite(value):
        raise StageFailed(f"{name} is {value}")
    return value


class Timer:
    """Seconds spent in each phase of a stage (generation vs training), for the time-share metric."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = {}

    def phase(self, name: str) -> _Phase:
        return _Phase(self, name)


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

