"""One optimizer step of one DeepSpeed engine: the LR, the clip, the health gate and the router-bias update.

Pre-training and every RLHF stage step their engines through this object, so
a behaviour of the step (the gradient-health veto, aux-loss-free bias
balancing, the LR the schedule and the health policy agree on) exists once.
The order inside a step is fixed by DeepSpeed:

    lr = step.begin()                       # LR and clip for the coming update
    for each micro batch:  engine.backward(loss); ...; engine.step()
        (before the last engine.step(): step.judge(loss))   # arms the health gate
    verdict = step.finish(loads)            # the gate's verdict; biases move only if the update applied

`update(loss)` does the whole sequence for a single micro batch (RLHF).
DeepSpeed calls the gate from inside `engine.step()`, after it has the global
gradient norm and before any weight changes (`ava.train.engine.update_gate`).
"""

from __future__ import annotations

from typing import Any

import torch

from ava.train.engine.gradient_health import HealthMonitor, Verdict
from ava.train.engine.lr_schedule import LRSchedule
from ava.train.engine.router_balance import balance_router_biases, uses_bias_balancing
from ava.train.engine.update_gate import UpdateGate, set_clip, set_lr


class OptimizerStep:
    """The updates of one trained engine, numbered from 1 (`updates` counts those begun)."""

    def __init__(self, engine: Any, schedule: LRSchedule, health: HealthMonitor | None = None,
                 bias_update_rate: float | None = None) -> None:
        self.engine, self.schedule, self.health = engine, schedule, health
        self.gate = UpdateGate(engine, health) if health is not None else None
        # aux_loss_free routing: the same on every rank, so the collective in the bias update stays matched.
        self.bias_update_rate = bias_update_rate if uses_bias_balancing(engine.module) else None
        self.updates = 0
        self.lr = 0.0  # the LR of the update in progress (or the last one)
        self.grad_norm: float | None = None  # the last update's global gradient norm (judged before clipping)

    @property
    def balances_biases(self) -> bool:
        """Whether the caller should collect each training forward's expert loads for `finish`."""
        return self.bias_update_rate is not None

    def next_lr(self) -> float:
        """The LR the next update will use: the schedule (0-based) times the health policy's cool-down scale."""
        return self.schedule.lr(self.updates) * (self.health.lr_scale if self.health is not None else 1.0)

    def begin(self) -> float:
        """Start update `updates + 1`: set its LR and clip threshold on the engine; returns the LR."""
        self.lr = self.next_lr()
        set_lr(self.engine, self.lr)
        self.updates += 1
        if self.health is not None:
            set_clip(self.engine, self.health.clip_value(self.updates))
        return self.lr

    def judge(self, loss: torch.Tensor, measure_update: bool = False) -> None:
        """Arm the health gate: call after the update's last backward, before its `engine.step()`.

        `loss` (this rank's, a device tensor) goes into the health record;
        `measure_update` also measures |update| / |weights| (a host sync).
        """
        if self.gate is not None:
            self.gate.begin(self.updates, loss, measure_update=measure_update)

    def finish(self, loads: list[torch.Tensor] | None = None) -> Verdict | None:
        """After `engine.step()`: the health verdict (None without the monitor); biases move if it applied.

        The health monitor's events of this update wait in `health.drain_events()`.
        """
        verdict = None
        if self.gate is not None and self.health is not None:
            verdict = self.gate.finish()
            self.grad_norm = self.gate.grad_norm
            self.health.end_step(self.updates, verdict)
        if self.bias_update_rate is not None and (verdict is None or verdict.apply):
            balance_router_biases(self.engine.module, loads or [], self.bias_update_rate)
        return verdict

    def update(self, loss: torch.Tensor, loads: list[torch.Tensor] | None = None) -> Verdict | None:
        """The whole update for one micro batch: begin, backward `loss`, judge, step, finish."""
        self.begin()
        self.engine.backward(loss)
        self.judge(loss.detach().float())
        self.engine.step()
        return self.finish(loads)

    def read_grad_norm(self) -> float | None:
        """The last update's gradient norm as a host float (the gate's, else DeepSpeed's); a host sync."""
        if self.gate is not None:
            return self.gate.grad_norm
        norm = self.engine.get_global_grad_norm()
        return None if norm is None else float(norm)
