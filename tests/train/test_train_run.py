"""`train.py` end to end: it trains, writes its outputs and refuses to clobber an earlier run.

Multi-rank runs are in test_loss_agreement (every ZeRO stage against one
process) and test_exact_resume.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO
from tests.train.run_helpers import SMALL_RUN, TINY, run_env


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_train_py_lowers_the_loss_and_writes_config_metrics_and_summary(tmp_path):
    out = tmp_path / "run"
    # With the blocks compiled (training.compile: auto leaves them eager on CPU, as every other run here).
    result = subprocess.run([sys.executable, "train.py", *TINY, *SMALL_RUN, "--max_steps", "16",
                             "--output_dir", str(out), "--training.compile", "true"], cwd=REPO, env=run_env(),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "torch.compile: on for the 6 transformer blocks" in result.stdout
    records = _records(out)
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [4, 8, 12, 16]
    assert {"lr", "tokens_per_s", "router_loss", "moe/load_cv", "moe/layer0/load/expert0"} <= set(steps[0])
    assert records[-1]["step"] == 16 and records[-1]["eval_loss"] > 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 16
    assert summary["final_loss"] < summary["first_loss"] - 0.5  # from ~ln(4096) towards the 64-token corpus
    assert summary["entropy_rate"] > 0
    assert "max_steps: 16" in (out / "config.yaml").read_text()
    assert json.loads((out / "deepspeed.json").read_text())["train_batch_size"] == 4
    # A run stopped after its last step (a requeued job killed while exporting) resumes to a clean finish.
    again = subprocess.run([sys.executable, "train.py", *TINY, *SMALL_RUN, "--max_steps", "16",
                            "--output_dir", str(out), "--resume", "--training.compile", "true"], cwd=REPO,
                           env=run_env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-3000:]
    resumed = json.loads((out / "summary.json").read_text())
    assert resumed["status"] == "completed" and resumed["checks_passed"] and resumed["steps"] == 16
    assert resumed["eval_loss"] == summary["eval_loss"] and resumed["checks"]["checkpoint_reloads_exactly"]


def test_a_smoke_test_that_only_lowers_max_steps_runs_with_a_note_on_the_warmup(tmp_path):
    # tiny.yaml's warmup (10 steps) is longer than the run; the command line's max_steps outranks the file.
    out = tmp_path / "smoke"
    result = subprocess.run([sys.executable, "train.py", *TINY, "--max_steps", "8", "--output_dir", str(out)],
                            cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    console = result.stdout + result.stderr
    assert ("note: configs/gpu/tiny.yaml:43: training.warmup_steps: lowered from 10 to 0 (10% of "
            "training.max_steps = 8 from command line (--max_steps 8))") in console
    assert json.loads((out / "summary.json").read_text())["steps"] == 8
    assert "warmup_steps: 0" in (out / "config.yaml").read_text()
