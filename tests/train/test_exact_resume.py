"""A run killed with SIGKILL between checkpoints and resumed logs the same per-step losses, bit for bit.

The run evaluates every 5 steps, so the resumed run must also restore the
best-loss record and log the same evaluation losses at the same steps. A
gradient spike injected at step 16 halves the LR for an 8-step cool-down
that the kill (after the step-20 checkpoint) interrupts: the resumed run
must continue that policy from the checkpoint, and apply the configured
clip schedule, exactly as the uninterrupted run does.
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

from tests.conftest import REPO
from tests.train.run_helpers import SMALL_RUN, TINY, free_port, run_env

# A smaller model than tiny.yaml: checkpoints of the full tiny model make this test slow, not stronger.
RUN = [*TINY, *SMALL_RUN, "--hidden_size", "64", "--num_layers", "2", "--intermediate_size", "128", "--vocab_size", "128",
       "--max_steps", "40", "--save_steps", "10", "--logging_steps", "1", "--eval_steps", "5",
       "--sample_max_new_tokens", "4", "--training.gradient_health.baseline_warmup_steps=4",
       "--training.gradient_health.lr_cooldown_steps=8",
       # An annealing clip (2 -> 1 over 20 steps; tiny.yaml's own clip is constant), so the resume is also
       # checked to continue the clip schedule exactly.
       "--training.gradient_health.initial_clip_value=2.0"]
FAULTS = {"AVA_INJECT_FAULTS": "grad_spike@16"}


def _env() -> dict[str, str]:
    return {**run_env(), **FAULTS}


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _lr_and_clip(out: Path) -> dict[int, tuple[float, float]]:
    return {r["step"]: (r["lr"], r["clip"]) for r in _records(out) if "loss" in r}


def _losses(out: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def _evals(out: Path) -> dict[int, tuple[float, float]]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: (r["eval_loss"], r["best_eval_loss"]) for r in records if "eval_loss" in r}


def _command(launcher: list[str], out: Path, *extra: str) -> list[str]:
    """The run's command line; each launch gets a fresh master port (a killed run's port may linger)."""
    head = [*launcher, "--master_port", free_port()] if launcher[0] != sys.executable else launcher
    return [*head, "train.py", *RUN, "--output_dir", str(out), *extra]


def _kill_after_checkpoint(command: list[str], out: Path, tag: str) -> int:
    """Start a run, SIGKILL its whole process group once `latest` names `tag`; return its exit status."""
    proc = subprocess.Popen(command, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    latest = out / "checkpoints" / "latest"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        if latest.is_file() and latest.read_text().strip() == tag:
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    status = proc.wait(timeout=60)
    if "--master_port" in command:  # a killed run cannot release DeepSpeed's CPU all-reduce buffers itself
        port = command[command.index("--master_port") + 1]
        for stale in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"):
            stale.unlink(missing_ok=True)
    return status


@pytest.mark.slow
@pytest.mark.parametrize("stage", [None, "deepspeed_zero2", "deepspeed_zero3"],
                         ids=["1-process", "2-ranks-zero2", "2-ranks-zero3"])
def test_sigkilled_run_resumes_with_identical_per_step_losses(stage, tmp_path):
    if stage is None:
        launcher = [sys.executable]
        extra: tuple[str, ...] = ()
    else:
        ds = shutil.which("deepspeed") or str(Path(sys.executable).with_name("deepspeed"))
        launcher = [ds, "--num_gpus", "2"]
        extra = ("--distributed_config", f"configs/distributed/{stage}.yaml", "--batch_size", "2",
                 "--deepspeed.train_batch_size", "4", "--num_gpus", "2", "--cpu_offload", "false")
    full, broken = tmp_path / "full", tmp_path / "broken"
    done = subprocess.run(_command(launcher, full, *extra), cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]

    status = _kill_after_checkpoint(_command(launcher, broken, *extra), broken, "step00000020")
    assert status != 0 and not (broken / "summary.json").exists(), "the run finished before it could be killed"

    resumed = subprocess.run(_command(launcher, broken, *extra, "--resume"), cwd=REPO, env=_env(),
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert "resuming from" in resumed.stdout and "step00000020" in resumed.stdout
    expected, got = _losses(full), _losses(broken)
    assert sorted(got) == list(range(1, 41))  # steps logged after the checkpoint by the killed run were dropped
    assert got == expected  # exact float equality, every step
    assert sorted(_evals(broken)) == list(range(5, 41, 5))
    assert _evals(broken) == _evals(full)
    # The health policy resumed mid cool-down, and the clip schedule is the configured one after the resume.
    assert _lr_and_clip(broken) == _lr_and_clip(full)
    events = [(r["step"], r["event"]) for r in _records(broken) if "event" in r]
    assert events == [(16, "gradient_explosion"), (16, "lr_reduced"), (24, "lr_restored")]
    for step, (_, clip) in _lr_and_clip(broken).items():  # tiny.yaml: 2.0 -> 1.0 over 20 steps
        assert clip == pytest.approx(2.0 - min(1.0, (step - 1) / 20), rel=1e-12), step
    summaries = [json.loads((run / "summary.json").read_text()) for run in (full, broken)]
    assert summaries[0]["best_step"] == summaries[1]["best_step"] and summaries[0]["sample"] == summaries[1]["sample"]


@pytest.mark.slow
def test_a_checkpoint_in_the_layout_before_callbacks_still_resumes_exactly(tmp_path):
    """Ava's state file used to keep the evaluation monitor under "monitor" and the health monitor under
    "health"; a run checkpointed then resumes with both restored, as if it had never stopped."""
    import torch

    from ava.train.checkpoint.store import plain, read_state

    full, broken = tmp_path / "full", tmp_path / "broken"
    done = subprocess.run(_command([sys.executable], full), cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    status = _kill_after_checkpoint(_command([sys.executable], broken), broken, "step00000020")
    assert status != 0 and not (broken / "summary.json").exists(), "the run finished before it could be killed"
    state_file = broken / "checkpoints" / "step00000020" / "ava_state_rank0.pt"
    state = read_state(state_file)
    callbacks = state.pop("callbacks")
    state.update(monitor=callbacks["evaluation"], health=callbacks["gradient_health"])
    torch.save(plain(state), state_file)  # the layout an Ava before callbacks wrote

    resumed = subprocess.run(_command([sys.executable], broken, "--resume"), cwd=REPO, env=_env(),
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert _losses(broken) == _losses(full)
    assert _evals(broken) == _evals(full)  # the best-loss record came back from "monitor"
    assert _lr_and_clip(broken) == _lr_and_clip(full)  # the cool-down in progress came back from "health"
