"""`ava doctor` on a CPU machine: the environment report, a real 2-rank ZeRO-3 start, and what it says when it fails."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import REPO
from tests.train.run_helpers import run_env


def _doctor(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ava", "doctor", *args], cwd=REPO, env=env or run_env(),
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_doctor_reports_the_environment_and_starts_a_two_rank_zero3_job() -> None:
    import deepspeed
    import torch

    done = _doctor()
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    for expected in (torch.__version__, deepspeed.__version__, "cpu; backend gloo", "precision bf16",
                     "ZeRO-3 start check: ok: 2 ranks (gloo, cpu) ran 2 ZeRO-3 steps", "doctor: ready to train"):
        assert expected in out, expected


def test_a_job_that_does_not_finish_is_reported_as_hung_and_killed() -> None:
    done = _doctor("--timeout", "0.5")
    assert done.returncode == 1
    assert "hung: no result within" in done.stdout and "problem: a 2-rank ZeRO-3 job cannot run here" in done.stdout
    leftovers = subprocess.run(["pgrep", "-f", "ava/doctor/zero3_probe.py"], capture_output=True, text=True)
    assert leftovers.stdout.strip() == ""


def test_stale_world_size_and_missing_accelerator_setting_are_problems() -> None:
    env = {**run_env(), "WORLD_SIZE": "8"}
    env.pop("DS_ACCELERATOR")
    done = _doctor("--no_launch", env=env)
    assert done.returncode == 1
    assert "WORLD_SIZE=8 is set without RANK" in done.stdout
    assert "export DS_ACCELERATOR=cpu" in done.stdout
    assert "2 problem(s) found" in done.stdout
