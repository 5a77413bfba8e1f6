"""After `--resume`, the end-of-run summary says which steps its first loss, tokens and speed cover.

Those numbers come from the process that ran, so a run resumed from step 4
and ended at step 8 reports step 5's loss as its first and four steps' tokens;
without the step range a reader takes them for the whole run's.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ava.train.report.console import summary_rows
from ava.train.report.summary import step_range
from tests.conftest import REPO
from tests.train.run_helpers import SMALL_RUN, TINY, run_env, step_losses

RUN = [*TINY, *SMALL_RUN, "--hidden_size", "32", "--num_layers", "1", "--num_attention_heads", "2",
       "--intermediate_size", "64", "--vocab_size", "128", "--num_experts", "0", "--num_experts_per_token", "1",
       "--max_length", "16", "--max_eval_examples", "4", "--eval_steps", "4", "--save_steps", "4",
       "--logging_steps", "1", "--sample_max_new_tokens", "0", "--builtin_tokens", "20000"]


def test_a_fresh_run_covers_every_step_from_the_first():
    assert step_range(0, 8) == {"first": 1, "last": 8, "resumed_from": None, "text": "steps 1-8"}


def test_a_resumed_run_covers_the_steps_after_its_checkpoint():
    assert step_range(4, 8) == {"first": 5, "last": 8, "resumed_from": 4, "text": "steps 5-8 (resumed from step 4)"}
    assert step_range(8, 8)["text"] == "no steps (resumed from step 8)"  # resumed at the end: nothing ran


def test_the_table_names_the_steps_the_first_loss_and_tokens_come_from():
    summary = {"status": "completed", "steps": 8, "planned_steps": 8, "step_range": step_range(4, 8),
               "first_loss": 2.5, "final_loss": 2.0, "tokens": 4096, "tokens_per_s": 100.0}
    rows = dict(summary_rows(summary))
    assert rows["steps covered"] == "steps 5-8 (resumed from step 4)"
    assert rows["first loss"] == "2.5000 (step 5)"
    assert rows["tokens"] == "4,096 (steps 5-8)" and rows["tokens/s"] == "100 (steps 5-8)"
    fresh = dict(summary_rows({**summary, "step_range": step_range(0, 8)}))
    assert fresh["steps covered"] == "steps 1-8" and fresh["first loss"] == "2.5000" and fresh["tokens"] == "4,096"


def _train(out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([sys.executable, "train.py", *RUN, "--output_dir", str(out), *extra], cwd=REPO,
                          env=run_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done


@pytest.mark.slow
def test_a_resumed_runs_summary_says_it_covers_the_steps_after_the_checkpoint(tmp_path):
    out = tmp_path / "run"
    _train(out, "--max_steps", "4")
    first = json.loads((out / "summary.json").read_text())
    assert first["step_range"] == {"first": 1, "last": 4, "resumed_from": None, "text": "steps 1-4"}

    resumed = _train(out, "--max_steps", "8", "--resume")
    summary = json.loads((out / "summary.json").read_text())
    losses = step_losses(out)
    assert sorted(losses) == list(range(1, 9))
    # The existing keys stay, and now say what they cover: step 5's loss, four steps' tokens.
    assert summary["steps"] == 8 and summary["first_loss"] == pytest.approx(losses[5])
    assert summary["step_range"] == {"first": 5, "last": 8, "resumed_from": 4,
                                     "text": "steps 5-8 (resumed from step 4)"}
    assert summary["tokens"] == 4 * 4 * 16  # 4 steps x micro batch 4 x 16 tokens
    assert "steps 5-8 (resumed from step 4)" in resumed.stdout  # the table's "steps covered" row
    assert "PASSED: completed, 8 steps, steps 5-8 (resumed from step 4): loss " in resumed.stdout
