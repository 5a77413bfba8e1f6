"""The gradient-health policy on paper: clip schedule, baselines, explosions, LR cool-down, rollback, resume."""

from __future__ import annotations

import math

import pytest
import torch

from ava.config.schema.training import GradientHealthConfig
from ava.train.engine.gradient_health import HealthMonitor
from ava.train.runtime.faults import FaultPlan, FaultSpecError


def _monitor(**overrides) -> HealthMonitor:
    settings = {"baseline_warmup_steps": 3, "explosion_threshold": 5.0, "lr_cooldown_steps": 2,
                "max_consecutive_bad_steps": 3, "baseline_window": 4, **overrides}
    return HealthMonitor(GradientHealthConfig(**settings))


def test_clip_threshold_anneals_linearly_from_initial_to_final():
    m = _monitor(initial_clip_value=2.0, final_clip_value=0.5, warmup_steps=10)
    assert [m.clip_value(s) for s in (1, 6, 11, 500)] == [2.0, 1.25, 0.5, 0.5]
    assert _monitor(warmup_steps=0, final_clip_value=0.7).clip_value(1) == 0.7


def test_no_explosion_is_called_before_the_baseline_warmup():
    m = _monitor()
    assert m.judge(1, 1.0).apply and m.judge(2, 100.0).apply  # only 1 healthy norm seen before
    assert m.healthy_seen == 2 and not m.detecting


@pytest.mark.parametrize("baseline", ["ema", "median"])
def test_a_norm_above_threshold_times_the_baseline_is_an_explosion(baseline):
    m = _monitor(baseline=baseline)
    for step, norm in enumerate([1.0, 1.0, 1.0], start=1):
        assert m.judge(step, norm).kind == "healthy"
    assert m.judge(4, 4.9).kind == "healthy"  # below 5x
    verdict = m.judge(5, 50.0)
    assert verdict.kind == "explosion" and not verdict.apply
    events = m.drain_events()
    assert [e["event"] for e in events] == ["gradient_explosion", "lr_reduced"]
    assert events[0]["grad_norm"] == 50.0 and events[0]["baseline"] == pytest.approx(m.baseline)


def test_the_median_baseline_ignores_one_outlier_the_ema_follows():
    ema, median = _monitor(baseline="ema"), _monitor(baseline="median")
    for m in (ema, median):
        for step, norm in enumerate([1.0, 1.0, 4.0, 1.0], start=1):
            m.judge(step, norm)
    assert median.baseline == 1.0 and ema.baseline > 1.5


def test_nonfinite_norms_skip_and_never_enter_the_baseline():
    m = _monitor()
    m.judge(1, 2.0)
    for bad in (math.nan, math.inf):
        verdict = m.judge(2, bad, loss=math.nan)
        assert verdict.kind == "nonfinite" and not verdict.apply
    assert m.baseline == 2.0 and m.healthy_seen == 1
    events = m.drain_events()
    assert events[0]["grad_norm"] == "nan" and "loss" in events[0]["reason"]  # strict JSON, names the culprit


def test_lr_is_reduced_compounds_and_is_restored_after_the_cooldown():
    m = _monitor(lr_reduction_factor=0.5, lr_cooldown_steps=2, max_consecutive_bad_steps=0)
    for step in (1, 2, 3):
        m.end_step(step, m.judge(step, 1.0))
    m.end_step(4, m.judge(4, 100.0))
    assert m.lr_scale == 0.5
    m.end_step(5, m.judge(5, 100.0))  # a second explosion in the cool-down compounds
    assert m.lr_scale == 0.25
    for step in range(6, 6 + 3):
        m.end_step(step, m.judge(step, 100.0))
    assert m.lr_scale == 0.5 ** 3  # never below factor**3
    m.end_step(9, m.judge(9, 1.0))
    assert m.lr_scale == 0.125
    m.end_step(10, m.judge(10, 1.0))
    assert m.lr_scale == 1.0 and m.drain_events()[-1]["event"] == "lr_restored"


def test_without_auto_reduce_lr_the_lr_is_left_alone():
    m = _monitor(auto_reduce_lr=False)
    for step in (1, 2, 3):
        m.judge(step, 1.0)
    assert m.judge(4, 100.0).kind == "explosion" and m.lr_scale == 1.0


def test_consecutive_bad_steps_ask_for_a_rollback_and_rollbacks_are_bounded():
    m = _monitor(max_consecutive_bad_steps=3, max_rollbacks=2)
    m.judge(1, 1.0)
    verdicts = [m.judge(step, math.nan) for step in (2, 3, 4)]
    assert [v.rollback for v in verdicts] == [False, False, True]
    m.rolled_back(4, to_step=1, skipped_batches=3)
    assert m.consecutive_bad == 0 and m.rollbacks == 1 and not m.rollbacks_exhausted
    assert m.judge(2, 1.0).apply  # a healthy step resets the count
    m.rolled_back(9, to_step=5, skipped_batches=4)
    assert m.rollbacks_exhausted
    assert _monitor(max_consecutive_bad_steps=0).judge(1, math.nan).rollback is False


def test_a_resumed_monitor_continues_the_same_policy():
    m = _monitor(lr_cooldown_steps=5)
    for step in (1, 2, 3):
        m.judge(step, 1.0, loss=3.0)
    m.end_step(4, m.judge(4, 100.0))
    restored = _monitor(lr_cooldown_steps=5)
    restored.load_state_dict(m.state_dict())
    for step in range(5, 12):
        a, b = m.judge(step, 1.0 + step / 100), restored.judge(step, 1.0 + step / 100)
        m.end_step(step, a)
        restored.end_step(step, b)
        assert (a, m.lr_scale, m.baseline) == (b, restored.lr_scale, restored.baseline)
    assert restored.summary() == m.summary()


def test_fault_specs_parse_and_bad_ones_say_how_to_write_them():
    plan = FaultPlan.parse("grad_spike@8x100, nan_loss@12, nan_grad@20-22:rank1")
    assert [(f.kind, f.first, f.last, f.factor, f.rank) for f in plan.faults] == [
        ("grad_spike", 8, 8, 100.0, None), ("nan_loss", 12, 12, 1000.0, None), ("nan_grad", 20, 22, 1000.0, 1)]
    for bad in ("spike@3", "nan_grad@5-2", "nan_loss"):
        with pytest.raises(FaultSpecError, match="AVA_INJECT_FAULTS"):
            FaultPlan.parse(bad)
    assert FaultPlan.from_env({}) is None


def test_faults_change_the_gradient_not_the_loss_and_fire_once_per_step():
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    plan = FaultPlan.parse("grad_spike@1x10,nan_grad@2,nan_loss@3,grad_spike@4:rank1")

    def grad(step: int, rank: int = 0) -> tuple[float, torch.Tensor]:
        w.grad = None
        loss = plan.apply(step, rank, (w * w).sum())
        loss.backward()
        return float(loss.detach()), w.grad.clone()

    loss, g = grad(1)
    assert loss == 5.0 and torch.equal(g, torch.tensor([20.0, 40.0]))
    loss, g = grad(2)
    assert loss == 5.0 and torch.isnan(g).all()
    loss, g = grad(3)
    assert math.isnan(loss)
    assert torch.equal(grad(4, rank=0)[1], torch.tensor([2.0, 4.0]))  # rank 1 only
    assert torch.equal(grad(1)[1], torch.tensor([2.0, 4.0]))  # step 1 again (after a rollback): clean


def test_fp16_loss_scale_overflows_are_not_bad_steps():
    m = _monitor(max_consecutive_bad_steps=2)
    verdicts = [m.loss_scale_skip(step) for step in (1, 2, 3)]
    assert not any(v.apply or v.rollback for v in verdicts)
    assert m.consecutive_bad == 0 and m.counts["loss_scale_skips"] == 3 and m.drain_events() == []
