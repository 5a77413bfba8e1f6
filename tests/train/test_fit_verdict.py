"""`diagnose_fit`: the overfitting / underfitting / healthy verdict of the end-of-run summary.

The three curves are the BEHRT troubleshooting guide's own numbers.
"""

from __future__ import annotations

import json
import math

import pytest

from ava.train.report.fit_verdict import FitVerdict, diagnose_fit

EVAL_EVERY = 100
LOG_EVERY = 25

# (training loss, validation loss) at each evaluation, from the BEHRT guide.
OVERFITTING = [(7.20, 7.05), (6.97, 6.92), (6.60, 7.03), (6.26, 7.14)]
UNDERFITTING = [(7.00, 6.95), (6.90, 6.88), (6.85, 6.82), (6.80, 6.78)]
HEALTHY = [(7.00, 6.95), (6.50, 6.48), (6.20, 6.22), (6.00, 6.05)]


def _run(curve: list[tuple[float, float]]) -> list[dict]:
    """Training records every LOG_EVERY steps whose mean over each evaluation interval is the curve's train loss."""
    records: list[dict] = []
    for i, (train, val) in enumerate(curve, start=1):
        eval_step = i * EVAL_EVERY
        for offset, jitter in zip(range(EVAL_EVERY - 3 * LOG_EVERY, EVAL_EVERY + 1, LOG_EVERY),
                                  (0.02, -0.02, 0.01, -0.01), strict=True):
            records.append({"step": eval_step - EVAL_EVERY + offset, "loss": train + jitter, "lm_loss": train,
                            "lr": 1e-4})
        records.append({"step": eval_step, "eval_loss": val, "eval_perplexity": math.exp(val),
                        "best_eval_loss": val})
    records.append({"step": len(curve) * EVAL_EVERY, "event": "checkpoint_saved"})
    return records


def test_behrt_overfitting_curve_is_overfitting_with_best_and_last_numbers() -> None:
    fit = diagnose_fit(_run(OVERFITTING))
    assert fit.verdict == "overfitting"
    assert fit.eval_loss == pytest.approx(7.14)
    assert fit.train_loss == pytest.approx(6.26)
    assert fit.gap == pytest.approx(0.88)
    assert fit.line().startswith("fit: overfitting -- validation loss rose from 6.92 (step 200) to 7.14 (step 400) "
                                 "while training loss fell from 6.97 to 6.26 (gap 0.88)")
    for advice in ("checkpoints/best", "training.early_stopping_patience", "model.hidden_dropout",
                   "training.weight_decay", "training.lora.rank"):
        assert advice in fit.reason


def test_behrt_underfitting_curve_is_underfitting() -> None:
    fit = diagnose_fit(_run(UNDERFITTING))
    assert fit.verdict == "underfitting"
    assert fit.train_loss == pytest.approx(6.80)
    assert fit.gap == pytest.approx(-0.02)
    assert "7.00 to 6.80, 2.9%" in fit.reason and "6.95 to 6.78, 2.4%" in fit.reason
    assert "training.learning_rate" in fit.reason and "training.lora.train_embeddings" in fit.reason


def test_behrt_healthy_curve_is_healthy_with_its_gap() -> None:
    fit = diagnose_fit(_run(HEALTHY))
    assert fit.verdict == "healthy"
    assert fit.gap == pytest.approx(0.05)
    assert "gap 0.05" in fit.reason


def test_small_rise_of_validation_loss_is_not_overfitting() -> None:
    # 6.22 -> 6.30 is within 2% of the best (6.22): noise, not a turn.
    fit = diagnose_fit(_run([(7.00, 6.95), (6.50, 6.48), (6.20, 6.22), (6.00, 6.30)]))
    assert fit.verdict == "healthy"


def test_validation_rising_while_training_also_rises_is_not_overfitting() -> None:
    fit = diagnose_fit(_run([(7.20, 7.05), (6.97, 6.92), (7.10, 7.03), (7.30, 7.14)]))
    assert fit.verdict != "overfitting"


def test_fewer_evaluations_than_required_is_undetermined() -> None:
    records = _run(OVERFITTING[:2])
    fit = diagnose_fit(records)
    assert fit.verdict == "undetermined"
    assert "only 2 evaluation(s)" in fit.reason and "3 needed" in fit.reason
    assert "training.eval_steps" in fit.reason
    assert fit.eval_loss == pytest.approx(6.92)  # the numbers it has are still reported
    assert diagnose_fit(records, min_evaluations=2).verdict != "undetermined"


def test_non_finite_losses_are_skipped() -> None:
    records = _run(OVERFITTING)
    records[1]["loss"] = float("nan")      # replaced by the remaining ones of its window
    records[2]["loss"] = "inf"
    records.insert(6, {"step": 150, "eval_loss": float("nan")})
    records.insert(6, {"step": 160, "eval_loss": "NaN", "best_eval_loss": 6.92})
    fit = diagnose_fit(records)
    assert fit.verdict == "overfitting"
    assert fit.eval_loss == pytest.approx(7.14) and fit.train_loss == pytest.approx(6.26)


def test_non_finite_evaluations_do_not_count_towards_the_minimum() -> None:
    records = _run(OVERFITTING)
    for record in records:
        if record.get("step") in (100, 200) and "eval_loss" in record:
            record["eval_loss"] = float("nan")
    fit = diagnose_fit(records)
    assert fit.verdict == "undetermined"
    assert "only 2 evaluation(s)" in fit.reason


def test_evaluation_losses_all_non_finite_is_undetermined() -> None:
    records = [{**r, "eval_loss": float("inf")} if "eval_loss" in r else r for r in _run(HEALTHY)]
    fit = diagnose_fit(records)
    assert fit.verdict == "undetermined"
    assert fit.reason.startswith("no evaluation with a finite loss")
    assert (fit.train_loss, fit.eval_loss, fit.gap) == (None, None, None)


def test_train_loss_at_an_evaluation_is_the_mean_since_the_previous_evaluation() -> None:
    records = [{"step": s, "loss": v} for s, v in ((50, 9.0), (100, 8.0), (150, 6.0), (200, 5.0),
                                                   (250, 4.0), (300, 2.0))]
    records += [{"step": s, "eval_loss": 5.0} for s in (100, 200, 300)]
    # (200, 300]: steps 250 and 300. Not step 200 (that belongs to the previous evaluation), not only step 300.
    assert diagnose_fit(records).train_loss == pytest.approx(3.0)


def test_evaluation_without_a_training_record_in_its_window_takes_the_nearest_earlier_one() -> None:
    records = [{"step": s, "loss": v} for s, v in ((50, 7.0), (100, 6.0), (150, 5.5))]
    records += [{"step": s, "eval_loss": 6.0} for s in (100, 110, 120)]
    assert diagnose_fit(records).train_loss == pytest.approx(6.0)  # step 100's, the last before (110, 120]


def test_first_window_leaves_out_the_loss_of_the_random_initialisation() -> None:
    records = _run(UNDERFITTING)
    for record in records:  # the steep first steps, far above the plateau
        if record["step"] in (25, 50) and "loss" in record:
            record["loss"] = 10.4
    assert diagnose_fit(records).verdict == "underfitting"


def test_baseline_evaluation_before_any_training_is_left_out() -> None:
    records = [{"step": 0, "eval_loss": 10.4}, *_run(UNDERFITTING)]
    assert diagnose_fit(records).verdict == "underfitting"


def test_repeated_step_after_resume_counts_its_last_record() -> None:
    records = _run(OVERFITTING)
    records.append({"step": 400, "eval_loss": 6.70})  # the same step evaluated again after a resume
    fit = diagnose_fit(records)
    assert fit.eval_loss == pytest.approx(6.70)
    assert fit.verdict != "overfitting"


def test_verdict_serialises_to_json() -> None:
    fit = diagnose_fit(_run(HEALTHY))
    data = json.loads(json.dumps(fit.as_dict()))
    assert data["verdict"] == "healthy"
    assert FitVerdict(**data) == fit


def test_evaluation_records_own_train_loss_judges_runs_that_log_less_often_than_they_evaluate() -> None:
    # logging_steps 50 > eval_steps 10: no training record between evaluations, only the first one's window.
    records = [{"step": 10, "loss": 7.0}]
    for step, (train, val) in zip((10, 20, 30, 40), ((7.0, 6.95), (6.5, 7.1), (6.1, 7.3), (5.8, 7.5)), strict=True):
        records.append({"step": step, "eval_loss": val, "train_loss": train, "train_val_gap": val - train})
    verdict = diagnose_fit(records)
    assert verdict.verdict == "overfitting"
    assert verdict.train_loss == 5.8 and verdict.gap == pytest.approx(1.7)


def test_moe_router_loss_is_left_out_of_the_training_side_of_the_gap() -> None:
    # The total loss carries 0.3 of router losses that evaluation (lm_loss only) never sees.
    records = []
    for step, lm, val in ((10, 7.0, 6.95), (20, 6.5, 6.48), (30, 6.2, 6.22), (40, 6.0, 6.05)):
        records += [{"step": step, "loss": lm + 0.3, "lm_loss": lm}, {"step": step, "eval_loss": val}]
    verdict = diagnose_fit(records)
    assert verdict.train_loss == 6.0 and verdict.gap == pytest.approx(0.05)


def _on_sets(records: list[dict], sets: dict[int, str]) -> list[dict]:
    """The records with each evaluation's `held_out` fingerprint set from `sets` (by step)."""
    return [{**r, "held_out": sets[r["step"]]} if "eval_loss" in r and r["step"] in sets else r for r in records]


def test_evaluations_on_different_held_out_sets_get_no_verdict_and_say_where_the_set_changed() -> None:
    # The overfitting curve, but the last two evaluations were made on another held-out set (a resume with
    # other data settings): their rise says nothing about the model, so no verdict compares them.
    records = _on_sets(_run(OVERFITTING), {100: "a" * 32, 200: "a" * 32, 300: "b" * 32, 400: "b" * 32})
    fit = diagnose_fit(records)
    assert fit.verdict == "undetermined"
    assert "2 different held-out sets (aaaaaaaaaaaa at steps 100-200, bbbbbbbbbbbb at steps 300-400)" in fit.reason
    assert "cannot be compared" in fit.reason and "resume with the settings the run started with" in fit.reason
    assert fit.eval_loss == pytest.approx(7.14)  # the numbers of the last evaluation are still reported


def test_evaluations_on_one_held_out_set_or_unnamed_ones_are_judged_as_before() -> None:
    same = _on_sets(_run(OVERFITTING), {100: "a" * 32, 200: "a" * 32, 300: "a" * 32, 400: "a" * 32})
    assert diagnose_fit(same).verdict == "overfitting"
    older = _on_sets(_run(OVERFITTING), {300: "a" * 32, 400: "a" * 32})  # records from before fingerprints
    assert diagnose_fit(older).verdict == "overfitting"
