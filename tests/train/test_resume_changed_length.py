"""A run resumed with another `--max_steps` continues the same data and evaluates on the same held-out set.

Issue 22: the built-in corpus used to be sized from max_steps, so a 30-step run
resumed with `--max_steps 40` trained on a re-cut corpus whose held-out rows
had partly become training rows, and the fit verdict compared evaluations on
two different sets. With a constant LR (whose rates do not depend on the run's
length) the resumed run must log exactly the uninterrupted 40-step run's
losses: same rows, same order, same held-out set (and with
`data.sampling: random_windows`, the same windows). With a decaying LR the
resume keeps the checkpoint's decay horizon and says so; a resume that does
change the held-out set gets no fit verdict across the change.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.train.run_helpers import SMALL_RUN, TINY, run_env, step_losses

RUN = [*TINY, *SMALL_RUN, "--hidden_size", "64", "--num_layers", "2", "--intermediate_size", "128", "--vocab_size", "128",
       "--save_steps", "10", "--logging_steps", "1", "--eval_steps", "5", "--sample_max_new_tokens", "4"]


def _train(out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([sys.executable, "train.py", *RUN, "--output_dir", str(out), *extra], cwd=REPO,
                          env=run_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _evals(out: Path) -> dict[int, tuple[float, str]]:
    return {r["step"]: (r["eval_loss"], r["held_out"]) for r in _records(out) if "eval_loss" in r}


def _data_line(stdout: str) -> str:
    return next(line for line in stdout.splitlines() if line.startswith("data: "))


@pytest.mark.slow
@pytest.mark.parametrize("sampling, trained", [("packed", "15609 training"),
                                                ("random_windows", "998,976 training tokens in random windows")])
def test_a_resume_with_more_steps_continues_the_same_data_and_held_out_set(tmp_path, sampling, trained):
    constant = ("--lr_scheduler_type", "constant", "--sampling", sampling)
    full, extended = tmp_path / "full", tmp_path / "extended"
    uninterrupted = _train(full, *constant, "--max_steps", "40")
    first = _train(extended, *constant, "--max_steps", "30")
    before = json.loads((extended / "summary.json").read_text())["held_out"]
    resumed = _train(extended, *constant, "--max_steps", "40", "--resume")
    assert "resuming from" in resumed.stdout and "step00000030" in resumed.stdout
    assert _data_line(first.stdout) == _data_line(resumed.stdout) == _data_line(uninterrupted.stdout)
    assert f"{trained} and 16 held-out sequences" in _data_line(resumed.stdout)  # builtin_tokens, not max_steps

    got, expected = step_losses(extended), step_losses(full)
    assert sorted(got) == list(range(1, 41)) and got == expected  # the same rows in the same order, bit for bit
    assert _evals(extended) == _evals(full)
    assert len({held_out for _, held_out in _evals(extended).values()}) == 1
    summaries = [json.loads((run / "summary.json").read_text()) for run in (full, extended)]
    assert summaries[0]["held_out"] == summaries[1]["held_out"] == before
    assert before["sequences"] == 16 and len(before["fingerprint"]) == 32
    assert summaries[1]["fit"]["verdict"] != "undetermined"
    assert not [r for r in _records(extended) if "event" in r]  # a constant LR does not depend on the length


@pytest.mark.slow
def test_a_resume_keeps_the_lr_horizon_and_refuses_a_verdict_across_another_held_out_set(tmp_path):
    out = tmp_path / "run"
    _train(out, "--max_steps", "30")
    first = json.loads((out / "summary.json").read_text())
    lrs_before = {r["step"]: r["lr"] for r in _records(out) if "lr" in r}
    resumed = _train(out, "--max_steps", "40", "--max_eval_examples", "8", "--resume")

    lrs = {r["step"]: r["lr"] for r in _records(out) if "lr" in r}
    assert {s: lrs[s] for s in range(1, 31)} == lrs_before
    assert [lrs[s] for s in range(31, 41)] == [pytest.approx(1e-4)] * 10  # tiny.yaml's lr_end: no jump back up
    events = {r["event"]: r for r in _records(out) if "event" in r}
    assert events["lr_schedule_kept"]["step"] == 30 and "lr schedule kept at step 30" in resumed.stdout
    assert "held out changed at step 30" in resumed.stdout

    summary = json.loads((out / "summary.json").read_text())
    assert summary["held_out"]["fingerprint"] != first["held_out"]["fingerprint"]
    assert summary["held_out"]["sequences"] == 8
    assert summary["fit"]["verdict"] == "undetermined" and "different held-out sets" in summary["fit"]["reason"]
