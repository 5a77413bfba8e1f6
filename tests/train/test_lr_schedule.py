"""The learning-rate schedule, checked against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from ava.train.engine.lr_schedule import LRSchedule


def test_linear_warmup_then_cosine_decay_to_lr_end():
    s = LRSchedule(peak=1e-3, end=1e-4, warmup_steps=10, total_steps=110, warmup="linear", decay="cosine")
    assert s.lr(0) == pytest.approx(1e-4)  # (0 + 1) / 10 of the peak: the first step already trains
    assert s.lr(4) == pytest.approx(5e-4)
    assert s.lr(10) == pytest.approx(1e-3)  # peak right after warmup
    assert s.lr(60) == pytest.approx(1e-4 + 0.9e-3 * 0.5)  # halfway through the decay: cos(pi/2) = 0
    assert s.lr(110) == pytest.approx(1e-4) and s.lr(500) == pytest.approx(1e-4)


def test_cosine_warmup_is_slow_then_fast():
    s = LRSchedule(peak=1.0, end=0.0, warmup_steps=4, total_steps=8, warmup="cosine", decay="linear")
    assert [round(s.lr(i), 6) for i in range(4)] == [
        round(0.5 * (1 - math.cos(math.pi * f)), 6) for f in (0.25, 0.5, 0.75, 1.0)]
    assert s.lr(6) == pytest.approx(0.5)  # linear decay: 2 of 4 decay steps done


def test_constant_holds_the_peak_and_zero_warmup_starts_at_the_peak():
    s = LRSchedule(peak=3e-5, end=0.0, warmup_steps=0, total_steps=100, decay="constant")
    assert s.lr(0) == s.lr(99) == s.lr(1000) == 3e-5


def test_multiplier_drives_torch_lambda_lr_to_the_same_rates():
    s = LRSchedule(peak=0.5, end=0.05, warmup_steps=3, total_steps=12)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=s.peak)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, s.multiplier)
    seen = []
    for _ in range(15):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([s.lr(i) for i in range(15)])


def test_impossible_schedules_are_refused():
    with pytest.raises(ValueError, match="warmup_steps"):
        LRSchedule(peak=1.0, end=0.0, warmup_steps=20, total_steps=10)
    with pytest.raises(ValueError, match="unknown schedule shape"):
        LRSchedule(peak=1.0, end=0.0, warmup_steps=1, total_steps=10, decay="step")


def test_keeping_a_shorter_horizon_on_resume_is_explained_with_the_numbers():
    from ava.train.engine.lr_schedule import horizon_note

    kept = LRSchedule(peak=1e-3, end=1e-4, warmup_steps=10, total_steps=30)
    derived = LRSchedule(peak=1e-3, end=1e-4, warmup_steps=10, total_steps=40)
    note = horizon_note(kept, derived, resumed_at=30, planned=40)
    assert note is not None
    assert "keeps the checkpoint's decay over 30 steps, not the 40 now planned" in note
    assert f"step 31 trains at 0.0001 (a schedule re-derived over 40 steps would give {derived.lr(30):.3g})" in note
    assert "from step 31 to step 40 it stays at lr_end 0.0001" in note
    longer = horizon_note(derived, kept, resumed_at=20, planned=30)
    assert longer is not None and f"ends at step 30 with the LR at {derived.lr(29):.3g}, before the decay" in longer
    assert horizon_note(kept, kept, resumed_at=30, planned=30) is None
    constant = LRSchedule(peak=1e-3, end=0.0, warmup_steps=2, total_steps=30, decay="constant")
    assert horizon_note(constant, LRSchedule(1e-3, 0.0, 2, 40, decay="constant"), 30, 40) is None  # same rates
