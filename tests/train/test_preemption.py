"""A stop signal (SLURM's SIGTERM/SIGUSR1) checkpoints and exits 75; `--auto_resume` continues to the end.

Run for real: train.py as a subprocess (and under the deepspeed launcher,
which forwards SIGTERM to its ranks), signalled once it has logged steps.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ava.train.runtime.preemption import REQUEUE_EXIT_CODE, PreemptionFlag
from tests.conftest import REPO
from tests.train.run_helpers import SMALL_RUN, TINY, free_port, run_env, step_losses

pytestmark = pytest.mark.slow

STEPS = 300
RUN = [*TINY, *SMALL_RUN, "--hidden_size", "64", "--num_layers", "2", "--intermediate_size", "128", "--vocab_size",
       "128", "--max_steps", str(STEPS), "--save_steps", "1000", "--eval_steps", "100", "--sample_max_new_tokens", "4"]


def _signal_after_steps(command: list[str], out: Path, sig: int, group: bool = False) -> tuple[int, str]:
    """Start a run, send `sig` once it has logged a few steps (to its whole process group, as SLURM signals
    every process of a job step, with `group`); return its exit code and stdout."""
    proc = subprocess.Popen(command, cwd=REPO, env=run_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 3:
            (os.killpg if group else os.kill)(proc.pid, sig)
            break
        time.sleep(0.05)
    stdout, _ = proc.communicate(timeout=300)
    return proc.returncode, stdout


def test_sigusr1_checkpoints_exits_for_requeue_and_auto_resume_finishes_the_same_run(tmp_path):
    out, reference = tmp_path / "run", tmp_path / "reference"
    command = [sys.executable, "train.py", *RUN, "--output_dir", str(out), "--auto_resume"]
    code, stdout = _signal_after_steps(command, out, signal.SIGUSR1)
    assert code == REQUEUE_EXIT_CODE, stdout[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "preempted" and 0 < summary["steps"] < STEPS
    stopped = summary["steps"]
    assert Path(summary["final_checkpoint"]).name == f"step{stopped:08d}"
    assert "SIGUSR1 received" in stdout and "--auto_resume" in stdout

    resumed = subprocess.run(command, cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"resuming from {out / 'checkpoints' / f'step{stopped:08d}'}" in resumed.stdout
    done = json.loads((out / "summary.json").read_text())
    assert done["status"] == "completed" and done["steps"] == STEPS and done["checks_passed"]

    full = subprocess.run([sys.executable, "train.py", *RUN, "--output_dir", str(reference), "--auto_resume"],
                          cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=600)
    assert full.returncode == 0 and "resuming" not in full.stdout  # --auto_resume on a new directory starts fresh
    assert step_losses(out) == step_losses(reference)  # the preempted-and-requeued run is the same run, bit for bit


def test_sigterm_to_the_deepspeed_launcher_checkpoints_every_rank_and_the_requeued_run_completes(tmp_path):
    out = tmp_path / "run"
    launcher = shutil.which("deepspeed") or str(Path(sys.executable).with_name("deepspeed"))
    flags = [*RUN, "--distributed_config", "configs/distributed/deepspeed_zero2.yaml", "--batch_size", "2",
             "--deepspeed.train_batch_size", "4", "--num_gpus", "2", "--cpu_offload", "false",
             "--output_dir", str(out), "--auto_resume"]
    port = free_port()
    code, stdout = _signal_after_steps([launcher, "--num_gpus", "2", "--master_port", port, "train.py", *flags],
                                       out, signal.SIGTERM, group=True)
    assert code != 0, stdout[-3000:]  # the launcher reports its own termination; the ranks exited 75
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "preempted", stdout[-3000:]
    tag = f"step{summary['steps']:08d}"
    assert (out / "checkpoints" / tag / "COMPLETE").is_file()
    assert {p.name for p in (out / "checkpoints" / tag).glob("ava_state_rank*.pt")} == {
        "ava_state_rank0.pt", "ava_state_rank1.pt"}
    resumed = subprocess.run([launcher, "--num_gpus", "2", "--master_port", free_port(), "train.py", *flags],
                             cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"resuming from {out / 'checkpoints' / tag}" in resumed.stdout
    assert json.loads((out / "summary.json").read_text())["status"] == "completed"
    for stale in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"):
        stale.unlink(missing_ok=True)


def test_every_rank_learns_of_a_signal_at_the_step_after_it_arrives() -> None:
    """The flag read after a step is the previous step's agreement, so reading it never waits on this step."""
    flag = PreemptionFlag()
    device = torch.device("cpu")
    assert flag.agreed(device) is False
    flag.signal_name = "SIGTERM"
    assert flag.agreed(device) is False  # this step's agreement is still in flight
    assert flag.agreed(device) is True
    assert flag.agreed(device) is True
