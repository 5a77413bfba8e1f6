"""The KL coefficient controllers follow Ziegler et al.'s update and survive a checkpoint round trip."""

from __future__ import annotations

import pytest

from ava.rlhf.kl_control import AdaptiveKLController, FixedKLController, make_kl_controller


def test_fixed_controller_never_moves_and_round_trips():
    ctl = FixedKLController(0.05)
    ctl.update(current_kl=100.0, n_steps=1000)
    assert ctl.value == 0.05
    other = FixedKLController(1.0)
    other.load_state_dict(ctl.state_dict())
    assert other.value == 0.05


def test_adaptive_controller_raises_the_coefficient_when_kl_is_above_target_by_the_proportional_error():
    ctl = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10_000)
    ctl.update(current_kl=6.6, n_steps=256)  # error 0.1
    assert ctl.value == pytest.approx(0.1 * (1 + 0.1 * 256 / 10_000))


def test_adaptive_controller_lowers_the_coefficient_when_kl_is_below_target():
    ctl = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10_000)
    ctl.update(current_kl=5.4, n_steps=256)  # error -0.1
    assert ctl.value == pytest.approx(0.1 * (1 - 0.1 * 256 / 10_000))


def test_adaptive_controller_clips_the_error_at_twenty_percent_either_way():
    up = AdaptiveKLController(init_kl_coef=0.1, target=1.0, horizon=100)
    up.update(current_kl=50.0, n_steps=10)
    assert up.value == pytest.approx(0.1 * (1 + 0.2 * 10 / 100))
    down = AdaptiveKLController(init_kl_coef=0.1, target=1.0, horizon=100)
    down.update(current_kl=0.0, n_steps=10)
    assert down.value == pytest.approx(0.1 * (1 - 0.2 * 10 / 100))


def test_adaptive_state_round_trips_so_a_resumed_run_continues_identically():
    ctl = AdaptiveKLController(init_kl_coef=0.2, target=3.0, horizon=50)
    for kl in (4.0, 5.0, 1.0):
        ctl.update(kl, n_steps=8)
    resumed = AdaptiveKLController(init_kl_coef=0.2, target=3.0, horizon=50)
    resumed.load_state_dict(ctl.state_dict())
    assert resumed.value == ctl.value != 0.2
    ctl.update(2.0, n_steps=8)
    resumed.update(2.0, n_steps=8)
    assert resumed.value == ctl.value


def test_make_kl_controller_builds_the_requested_kind_and_rejects_adaptive_without_target():
    fixed = make_kl_controller("fixed", init=0.1, target=None, horizon=10_000)
    assert isinstance(fixed, FixedKLController) and fixed.value == 0.1
    adaptive = make_kl_controller("adaptive", init=0.1, target=6.0, horizon=10_000)
    assert isinstance(adaptive, AdaptiveKLController)
    assert (adaptive.value, adaptive.target, adaptive.horizon) == (0.1, 6.0, 10_000)
    with pytest.raises(ValueError, match="target"):
        make_kl_controller("adaptive", init=0.1, target=None, horizon=10_000)
    with pytest.raises(ValueError, match="unknown kind"):
        make_kl_controller("linear", init=0.1, target=None, horizon=10_000)
