"""`ava doctor` on a CPU machine: the environment report, a real 2-rank ZeRO-3 start, and what it says when it fails."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

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


def test_doctor_names_stale_op_build_locks_with_their_rm_and_a_running_build_is_no_problem(tmp_path, monkeypatch):
    from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

    from ava.train.runtime.op_build import torch_default_dir, venv_extensions_dir

    cache = tmp_path / "cache"  # torch's cache root, here: the real one is shared with other runs
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    ours, legacy = venv_extensions_dir(), torch_default_dir()

    def lock(directory: Path, op: str) -> Path:
        (directory / op).mkdir(parents=True)
        path = directory / op / "lock"
        path.touch()
        os.utime(path, (0, 0))  # written long ago
        os.utime(directory / op, (0, 0))
        return path

    stale, building, elsewhere = lock(ours, "deepspeed_shm_comm"), lock(ours, "cpu_adam"), lock(legacy, "fused_adam")
    holder = subprocess.Popen([sys.executable, "-c", "import os, sys, time\nfd = os.open(sys.argv[1], os.O_RDONLY)\n"
                               "print('holding', flush=True)\ntime.sleep(600)", str(building)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "holding\n"
        env = {**run_env(), "XDG_CACHE_HOME": str(cache), "COLUMNS": "500"}  # one line per row
        env.pop("TORCH_EXTENSIONS_DIR", None)
        done = _doctor("--no_launch", env=env)
    finally:
        holder.kill()
        holder.wait()
    out = re.sub(" +", " ", done.stdout)  # the table's padding
    assert done.returncode == 1, out
    assert f"op builds │ {ours} (this virtualenv's own; set TORCH_EXTENSIONS_DIR to choose another)" in out
    assert f"problem: DeepSpeed op-build lock {stale} is stale:" in out and f"Remove it: rm {stale}" in out
    assert f"{building}: a build is running (process {holder.pid} holds it)" in out
    assert f"{elsewhere}: stale" in out  # another venv's (or the old shared) directory: shown, not this run's problem
    assert "1 problem(s) found" in out
    answer = CPU_Accelerator().is_fp16_supported()
    assert f"precision fp16 │ {'yes' if answer else 'no'}: DeepSpeed's CPU_Accelerator.is_fp16_supported() " \
           f"returned {answer!r}" in out
