"""Where the gradient-health policy meets DeepSpeed: the norm it judges, the update it may skip, the clip it sets.

DeepSpeed's ZeRO-1/2/3 and bf16 optimizers wrap a basic torch optimizer.
Inside their `step()` they reduce the gradients, compute the global gradient
norm (before clipping), clip, call the basic optimizer's `step()` and copy the
new master weights back into the model. The one point every stage passes,
after the norm is known and before any weight changes, is that basic
`step()`: the gate sits there. Skipping it leaves the master weights, the
Adam moments and Adam's step count untouched, so the copy-back writes the
same weights and nothing of a bad step reaches the model.

Without a wrapper (ZeRO stage 0 in fp32) DeepSpeed computes no norm; the gate
computes it from the full gradients before `engine.step()` clips them.
When DeepSpeed itself finds NaN/Inf it skips the step before the gate is
reached; `finish()` then records that step as non-finite.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ava.train.engine.gradient_health import HealthMonitor, Verdict


def set_lr(engine: Any, lr: float) -> None:
    """The LR of the coming step, set directly: a pure function of the step and the health policy."""
    for group in engine.optimizer.param_groups:
        group["lr"] = lr


def set_clip(engine: Any, value: float) -> None:
    """The clip threshold DeepSpeed applies in the coming `engine.step()`.

    DeepSpeed reads it from the optimizer wrapper (`clip_grad`) or, without one,
    from its config, and restores the saved value on checkpoint load: the loop
    calls this before every step, so a load can never leave a stale value.
    """
    engine._config.gradient_clipping = value
    if engine.optimizer is not engine.basic_optimizer and hasattr(engine.optimizer, "clip_grad"):
        engine.optimizer.clip_grad = value


def clip_in_use(engine: Any) -> float:
    """The clip threshold DeepSpeed will apply (read back from where it reads it)."""
    if engine.optimizer is not engine.basic_optimizer and hasattr(engine.optimizer, "clip_grad"):
        return float(engine.optimizer.clip_grad)
    return float(engine.gradient_clipping())


def layer_grad_norms(module: torch.nn.Module) -> dict[str, float]:
    """Gradient norm per layer (`embed_tokens`, `layers.N`, `norm`, `lm_head`), after backward, before step.

    Uses DeepSpeed's `safe_get_full_grad`, which assembles each parameter's
    reduced gradient under any ZeRO stage (a collective: every rank calls it
    for the same parameters). Read back with one host sync.
    """
    from deepspeed.utils import safe_get_full_grad

    groups: dict[str, list[torch.Tensor]] = {}
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        grad = safe_get_full_grad(param)
        if grad is None:
            continue
        parts = name.split(".")
        layer = ".".join(parts[:2]) if parts[0] == "layers" else parts[0]
        groups.setdefault(layer, []).append(grad.detach().float().pow(2).sum())
    if not groups:
        return {}
    names = list(groups)
    values = torch.stack([torch.stack(groups[n]).sum() for n in names]).sqrt().tolist()
    return {f"grad_norm/{n}": v for n, v in zip(names, values, strict=True)}


class UpdateGate:
    """Judges each optimizer step with the health monitor and applies or skips its update."""

    def __init__(self, engine: Any, monitor: HealthMonitor) -> None:
        self.engine, self.monitor = engine, monitor
        self.base = engine.basic_optimizer
        # A wrapper (ZeRO or bf16) computes the global norm and holds partitioned master weights.
        self.wrapped = engine.optimizer is not self.base
        self._apply_update = self.base.step
        self.base.step = self._gated_step
        self._step = 0
        self._loss: torch.Tensor | None = None
        self._own_norm: float | None = None
        self._verdict: Verdict | None = None
        self._measure = False
        # (|update|^2, |weights before|^2, |weights after|^2) of this rank's share of the master weights,
        # kept on the device: no host sync per parameter.
        self._sums = torch.zeros(3, dtype=torch.float64, device=engine.device)
        self._measured = False
        self.grad_norm: float | None = None  # the judged (pre-clip) norm of the last step
        self.update_ratio: float | None = None  # |update| / |weights| of the last measured step
        self.weight_norm: float | None = None  # |master weights| after the last measured step

    def begin(self, step: int, loss: torch.Tensor, measure_update: bool) -> None:
        """Call after the last backward of optimizer step `step` and before its `engine.step()`."""
        self._step, self._loss, self._verdict = step, loss, None
        self._measure, self.update_ratio, self.weight_norm = measure_update, None, None
        self._sums.zero_()
        self._measured = False
        self._own_norm = None if self.wrapped else self._full_grad_norm()

    def _full_grad_norm(self) -> float:
        grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
        return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0

    def _judged_norm(self) -> float:
        if self._own_norm is not None:
            return self._own_norm
        # Set by every DeepSpeed wrapper before it calls the basic optimizer (private, but read
        # the same way by engine.get_global_grad_norm() after the step).
        norm = getattr(self.engine.optimizer, "_global_grad_norm", None)
        return math.inf if norm is None else float(norm)

    def _gated_step(self, *args: Any, **kwargs: Any) -> Any:
        # A wrapper may call this once per parameter group: judge once per optimizer step.
        if self._verdict is None:
            self._verdict = self._judge(self._judged_norm())
        if not self._verdict.apply:
            if self._measure:  # the weights stay as they are: read them while the wrapper exposes them
                with torch.no_grad():
                    for p in self._master_weights():
                        self._sums[2] += p.detach().double().pow(2).sum().to(self._sums.device)
                self._measured = True
            return None
        if not self._measure:
            return self._apply_update(*args, **kwargs)
        params = self._master_weights()
        before = [p.detach().clone() for p in params]
        out = self._apply_update(*args, **kwargs)
        with torch.no_grad():
            for p, old in zip(params, before, strict=True):
                self._sums[0] += (p.detach().double() - old.double()).pow(2).sum().to(self._sums.device)
                self._sums[1] += old.double().pow(2).sum().to(self._sums.device)
                self._sums[2] += p.detach().double().pow(2).sum().to(self._sums.device)
        self._measured = True
        return out

    def _master_weights(self) -> list[torch.Tensor]:
        """The tensors the basic optimizer updates: this rank's (partition of the) master weights.

        ZeRO-3 hands them to the basic optimizer only for the duration of its
        step; outside it they are its (private) flat fp32 partitions.
        """
        params = [p for group in self.base.param_groups for p in group["params"]]
        return params or list(getattr(self.engine.optimizer, "fp32_partitioned_groups_flat", []))

    def _judge(self, norm: float) -> Verdict:
        self.grad_norm = norm
        loss = float(self._loss) if self._loss is not None else None
        return self.monitor.judge(self._step, norm, loss)

    def finish(self) -> Verdict:
        """Call after `engine.step()`: the step's verdict (DeepSpeed's own NaN/Inf skip included)."""
        if self._verdict is None:  # DeepSpeed skipped the step before reaching the gate
            if self.engine.fp16_enabled():  # its dynamic loss scale overflowed: it lowers the scale and goes on
                self._verdict = self.monitor.loss_scale_skip(self._step)
            else:
                self._verdict = self._judge(math.inf if self.wrapped else self._judged_norm())
        if self._measure:
            if not self._measured:  # skipped: the weights are what they were; read them as they are
                with torch.no_grad():
                    for p in self._master_weights():
                        self._sums[2] += p.detach().double().pow(2).sum().to(self._sums.device)
            sums = self._sums.clone()
            if self.wrapped and torch.distributed.is_initialized():
                # Each rank updated its own partition of the master weights: add the shares up.
                torch.distributed.all_reduce(sums)
            update_sq, before_sq, after_sq = sums.tolist()
            self.weight_norm = math.sqrt(after_sq)
            if self._verdict.apply:
                self.update_ratio = math.sqrt(update_sq / before_sq) if before_sq > 0 else 0.0
        return self._verdict
