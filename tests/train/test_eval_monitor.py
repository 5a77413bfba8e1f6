"""The best-loss record and the early-stopping rule, and that both survive a checkpoint round trip."""

from __future__ import annotations

import math

from ava.train.callbacks.evaluation import EvalMonitor
from ava.train.report.perplexity import perplexity


def test_improvement_must_beat_the_best_by_more_than_the_threshold():
    monitor = EvalMonitor(patience=2, threshold=0.1)
    assert monitor.update(10, 3.0)
    assert not monitor.update(20, 2.95)  # better, but by less than the threshold
    assert monitor.best_loss == 3.0 and monitor.best_step == 10 and monitor.evals_without_improvement == 1
    assert monitor.update(30, 2.8)
    assert monitor.best_step == 30 and monitor.evals_without_improvement == 0


def test_stops_after_patience_evaluations_without_improvement():
    monitor = EvalMonitor(patience=2, threshold=0.0)
    monitor.update(1, 2.0)
    monitor.update(2, 2.5)
    assert not monitor.should_stop
    monitor.update(3, 2.0)  # equal is not an improvement
    assert monitor.should_stop


def test_no_patience_never_stops_and_nan_never_becomes_best():
    monitor = EvalMonitor(patience=None, threshold=0.0)
    assert not monitor.update(1, math.nan)
    assert monitor.best_step is None
    for step in range(2, 50):
        monitor.update(step, 5.0)
    assert not monitor.should_stop and monitor.best_step == 2


def test_state_dict_round_trip_continues_the_count():
    monitor = EvalMonitor(patience=3, threshold=0.0)
    monitor.update(5, 1.0)
    monitor.update(10, 1.5)
    restored = EvalMonitor(patience=3, threshold=0.0)
    restored.load_state_dict(monitor.state_dict())
    assert restored == monitor
    restored.update(15, 1.2)
    restored.update(20, 1.1)
    assert restored.should_stop


def test_perplexity_is_capped_for_a_diverged_run():
    assert perplexity(0.0) == 1.0
    assert math.isfinite(perplexity(1e6))
