"""`RunConsole`: a progress bar on a terminal, readable plain lines elsewhere, silence on other ranks."""

from __future__ import annotations

import io

from rich.console import Console

from ava.train.report.console import RunConsole, eval_line, step_line, summary_rows

STEP = {"step": 10, "loss": 2.3, "lm_loss": 2.29, "lr": 1e-3, "tokens_per_s": 5000.0, "moe/load_cv": 0.1}
LAST = {"step": 100, "loss": 2.1, "lr": 1e-4, "tokens_per_s": 6000.0}
EVAL = {"step": 50, "eval_loss": 2.5, "eval_perplexity": 12.18}
STOP = {"step": 100, "event": "early_stop", "reason": "3 evaluations without an improvement"}
SUMMARY = {"status": "completed", "steps": 100, "first_loss": 8.3, "final_loss": 2.1, "best_loss": 2.05,
           "eval_loss": 2.5, "tokens": 1234567, "seconds": 3723.4, "first_step_seconds": 12.3,
           "tokens_per_s": 5500.0, "memory/peak_allocated_gb": 3.25, "memory/max_rss_gb": 1.5,
           "output_dir": "outputs/tiny-1"}


def _run(terminal: bool, enabled: bool = True) -> str:
    out = io.StringIO()
    console = Console(file=out, force_terminal=terminal, width=120)
    with RunConsole(100, enabled=enabled, console=console) as run:
        run.log(STEP)
        run.log(EVAL)
        run.log(LAST)
        run.log(STOP)
    run.final_table(SUMMARY)
    return out.getvalue()


def test_redirected_output_gets_one_plain_line_per_logged_step_and_eval():
    text = _run(terminal=False)
    assert "\x1b" not in text  # no control codes in a log file
    lines = text.splitlines()
    assert lines[:4] == ["step     10  loss 2.3000  lr 1.00e-03  5,000 tok/s",
                         "eval at step 50: loss 2.5000  perplexity 12.18",
                         "step    100  loss 2.1000  lr 1.00e-04  6,000 tok/s",
                         "early stop at step 100: 3 evaluations without an improvement"]


def test_a_terminal_gets_a_progress_bar_with_loss_lr_and_throughput_and_eval_lines_above_it():
    text = _run(terminal=True)
    assert "100/100" in text and "10/100" in text
    assert "loss 2.1000" in text and "lr 1.00e-04" in text and "6,000 tok/s" in text
    assert "ETA" in text
    assert "eval at step 50: loss 2.5000  perplexity 12.18\n" in text
    assert "early stop at step 100: 3 evaluations without an improvement\n" in text
    assert "step     10  loss" not in text  # steps move the bar instead of printing lines


def test_the_final_table_shows_the_runs_numbers_in_both_modes():
    for terminal in (False, True):
        text = _run(terminal=terminal)
        for expected in ("completed", "100", "8.3000", "2.1000", "2.0500", "2.5000", "12.18", "1,234,567",
                         "1:02:03", "12.3 s", "5,500", "3.25 GB", "1.50 GB", "outputs/tiny-1"):
            assert expected in text, (terminal, expected)


def test_a_disabled_console_on_another_rank_prints_nothing():
    assert _run(terminal=True, enabled=False) == ""
    assert _run(terminal=False, enabled=False) == ""


def test_missing_values_show_as_dashes_and_absent_summary_keys_are_left_out():
    assert step_line({"step": 3, "loss": 1.5}) == "step      3  loss 1.5000  lr -  - tok/s"
    rows = dict(summary_rows({"status": "failed", "steps": 7, "eval_loss": None, "final_loss": None}))
    assert rows == {"status": "failed", "steps": "7"}


def test_the_table_says_how_many_steps_were_planned_where_the_best_eval_was_and_whether_checks_passed():
    rows = dict(summary_rows({"status": "early_stopped", "steps": 80, "planned_steps": 100, "best_eval_loss": 2.4,
                              "best_step": 60, "checks_passed": False}))
    assert rows == {"status": "early_stopped", "steps": "80 of 100", "best eval loss": "2.4000 (step 60)",
                    "run checks": "FAILED"}
    assert eval_line({"step": 60, "eval_loss": 2.4, "eval_perplexity": 11.02, "best_eval_loss": 2.4}) == \
        "eval at step 60: loss 2.4000  perplexity 11.02  best 2.4000"
    assert eval_line({"step": 60, "eval_loss": 2.4, "eval_perplexity": 11.02, "best_eval_loss": 2.4,
                      "train_loss": 2.25, "train_val_gap": 0.15}) == \
        "eval at step 60: loss 2.4000  perplexity 11.02  best 2.4000  train 2.2500  gap +0.1500"


def test_eval_perplexity_is_derived_from_the_eval_loss_when_the_summary_lacks_it():
    rows = dict(summary_rows({"eval_loss": 2.0}))
    assert rows["eval perplexity"] == "7.39"


def test_a_resumed_run_starts_the_bar_at_its_resumed_step():
    out = io.StringIO()
    with RunConsole(100, console=Console(file=out, force_terminal=True, width=120), start_step=40):
        pass
    assert "40/100" in out.getvalue() and " 0/100" not in out.getvalue()
