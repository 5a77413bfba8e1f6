"""Ctrl-C stops a run the way a scheduler's SIGTERM does, but for good: finish the step, checkpoint, exit 130.

A terminal sends SIGINT to its whole foreground process group, so the runs
below are signalled the same way (`os.killpg`): the single process, and under
the deepspeed launcher the launcher and both ranks at once. The first Ctrl-C
ends the run after its step with a checkpoint, the resume hint on the
console and status "interrupted" in summary.json; a second one stops at
once. Neither prints a traceback.
"""

from __future__ import annotations

import errno
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

from ava.train.runtime.preemption import INTERRUPT_EXIT_CODE, PreemptionFlag
from tests.conftest import REPO
from tests.train.run_helpers import SMALL_RUN, TINY, free_port, run_env

STEPS = 300
RUN = [*TINY, *SMALL_RUN, "--hidden_size", "64", "--num_layers", "2", "--intermediate_size", "128", "--vocab_size",
       "128", "--max_steps", str(STEPS), "--save_steps", "1000", "--eval_steps", "100", "--sample_max_new_tokens", "4"]
ACK = "Ctrl-C again stops at once"  # what the first Ctrl-C prints, on rank 0


def _ctrl_c_after_steps(command: list[str], out: Path, env: dict[str, str] | None = None) -> tuple[int, str]:
    """Start a run, press Ctrl-C (SIGINT to its process group) once it has logged a few steps; exit code and output.

    The output is read to its end, so it includes what processes the launcher left behind printed.
    """
    proc = subprocess.Popen(command, cwd=REPO, env=env or run_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 3:
            os.killpg(proc.pid, signal.SIGINT)
            break
        time.sleep(0.05)
    stdout, _ = proc.communicate(timeout=600)
    return proc.returncode, stdout


# ------------------------------------------------------------------ the flag itself (in this process)


@pytest.fixture
def flag():
    with PreemptionFlag() as installed:
        yield installed


def test_first_ctrl_c_asks_for_a_checkpoint_and_says_how_to_stop_at_once(flag, capfd) -> None:
    signal.raise_signal(signal.SIGINT)  # no KeyboardInterrupt: the run goes on to the end of its step
    assert flag.signal_name == "SIGINT"
    assert ACK in capfd.readouterr().err
    device = torch.device("cpu")
    assert flag.agreed(device) is False  # agreed one step later, as for SIGTERM
    assert flag.agreed(device) is True and flag.status == "interrupted"


def test_second_ctrl_c_stops_at_once_and_a_third_even_from_cleanup(flag, monkeypatch) -> None:
    signal.raise_signal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        signal.raise_signal(signal.SIGINT)

    class Exited(Exception):
        pass

    def _exit(status: int) -> None:
        raise Exited(status)

    monkeypatch.setattr(os, "_exit", _exit)
    with pytest.raises(Exited) as exited:  # a cleanup that hangs after the second one cannot hold the process
        signal.raise_signal(signal.SIGINT)
    assert exited.value.args == (INTERRUPT_EXIT_CODE,)


def test_ctrl_c_on_any_rank_beats_a_requeue_signal_and_sigterm_alone_still_requeues(flag) -> None:
    device = torch.device("cpu")
    signal.raise_signal(signal.SIGTERM)
    flag.agreed(device)
    assert flag.agreed(device) is True and flag.status == "preempted"
    # The deepspeed launcher answers a Ctrl-C with SIGTERM to its ranks: the person's Ctrl-C decides.
    signal.raise_signal(signal.SIGINT)
    signal.raise_signal(signal.SIGTERM)
    flag.agreed(device)
    assert flag.agreed(device) is True and flag.status == "interrupted"


# ------------------------------------------------------------------ through train.py


@pytest.mark.slow
def test_ctrl_c_checkpoints_prints_the_resume_hint_exits_130_and_the_run_resumes(tmp_path: Path) -> None:
    out = tmp_path / "run"
    code, stdout = _ctrl_c_after_steps([sys.executable, "train.py", *RUN, "--output_dir", str(out)], out)
    assert code == INTERRUPT_EXIT_CODE, stdout[-3000:]
    assert "Traceback" not in stdout and "KeyboardInterrupt" not in stdout, stdout[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "interrupted" and 0 < summary["steps"] < STEPS, summary
    point = out / "checkpoints" / f"step{summary['steps']:08d}"
    assert summary["final_checkpoint"] == str(point) and (point / "COMPLETE").is_file()
    assert f"continue with --output_dir {out} --resume" in stdout  # on the console, not only in summary.json
    assert f"continue with --output_dir {out} --resume" in summary["resume_hint"]

    resumed = subprocess.run([sys.executable, "train.py", *RUN, "--output_dir", str(out), "--resume"], cwd=REPO,
                             env=run_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"resuming from {point}" in resumed.stdout
    done = json.loads((out / "summary.json").read_text())
    assert done["status"] == "completed" and done["steps"] == STEPS


@pytest.mark.slow
def test_second_ctrl_c_stops_at_once_with_one_line_and_no_traceback(tmp_path: Path) -> None:
    """Held in start-up by a config file that is a pipe nobody writes, the run cannot finish between the presses."""
    hardware, out = tmp_path / "hardware.yaml", tmp_path / "run"
    os.mkfifo(hardware)
    command = [sys.executable, "train.py", "--config", "configs/gpu/tiny.yaml", "--hardware_config", str(hardware),
               *SMALL_RUN, "--output_dir", str(out)]
    proc = subprocess.Popen(command, cwd=REPO, env=run_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    writer = None
    try:
        deadline = time.monotonic() + 300
        while writer is None:  # opening the write end succeeds once the run holds the read end: it is waiting in it
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate(timeout=60)
            try:
                writer = os.open(hardware, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as error:
                if error.errno != errno.ENXIO:
                    raise
                time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGINT)
        said = []
        while not said or ACK not in said[-1]:
            said.append(proc.stderr.readline())
            assert said[-1], "the run ended at the first Ctrl-C:\n" + "".join(said)
        os.killpg(proc.pid, signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if writer is not None:
            os.close(writer)
        if proc.poll() is None:
            proc.kill()
    stderr = "".join(said) + stderr
    assert proc.returncode == INTERRUPT_EXIT_CODE, stdout[-3000:] + stderr[-3000:]
    assert "Traceback" not in stdout + stderr and "KeyboardInterrupt" not in stdout + stderr, stderr[-3000:]
    assert stderr.rstrip().endswith("interrupted"), stderr[-3000:]
    assert not out.exists()


@pytest.mark.slow
def test_ctrl_c_under_the_deepspeed_launcher_checkpoints_both_ranks_and_reports_interrupted(tmp_path: Path) -> None:
    """The launcher answers SIGINT by sending SIGTERM to the ranks (and SIGKILL 30 s later); they have the Ctrl-C too.

    The `deepspeed` command itself dies of the SIGINT at once (with its own
    traceback, printed by DeepSpeed's runner, which Ava cannot reach): what
    is checked is what the ranks do and leave behind.
    """
    out = tmp_path / "run"
    launcher = shutil.which("deepspeed") or str(Path(sys.executable).with_name("deepspeed"))
    port = free_port()
    command = [launcher, "--num_gpus", "2", "--master_port", port, "train.py", *RUN,
               "--distributed_config", "configs/distributed/deepspeed_zero2.yaml", "--batch_size", "2",
               "--deepspeed.train_batch_size", "4", "--num_gpus", "2", "--cpu_offload", "false",
               "--output_dir", str(out)]
    try:
        code, stdout = _ctrl_c_after_steps(command, out)
    finally:
        for stale in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"):
            stale.unlink(missing_ok=True)
    # DeepSpeed's own command ends by the SIGINT (-2, the shell shows 130) or, when its launch.py child's handler
    # exits first, with that child's status 1: either way a failure, and neither is Ava's to choose.
    assert code in (-signal.SIGINT, 1), stdout[-3000:]
    ranks = [line for line in stdout.splitlines() if line.startswith("[rank")]
    assert not any("Traceback" in line or "KeyboardInterrupt" in line for line in ranks), stdout[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "interrupted" and 0 < summary["steps"] < STEPS, stdout[-3000:]
    point = out / "checkpoints" / f"step{summary['steps']:08d}"
    assert (point / "COMPLETE").is_file()
    assert {p.name for p in point.glob("ava_state_rank*.pt")} == {"ava_state_rank0.pt", "ava_state_rank1.pt"}
    assert f"continue with --output_dir {out} --resume" in stdout


@pytest.mark.slow
def test_ctrl_c_during_an_rlhf_stage_checkpoints_the_stage_and_the_pipeline_reports_interrupted(tmp_path: Path) -> None:
    """RLHF stages stop through the same flag: the stage checkpoints, the pipeline exits 130 and says how to resume."""
    out = tmp_path / "run"
    command = [sys.executable, "train_rlhf.py", *TINY, "--rlhf_config", "configs/rlhf/test_cpu.yaml",
               "--hidden_size", "64", "--num_layers", "2", "--intermediate_size", "128", "--vocab_size", "257",
               "--max_position_embeddings", "64", "--max_length", "64", "--num_experts", "0", "--rlhf.stages", "[sft]",
               "--rlhf.sft.steps", "1000", "--rlhf.sft.logging_steps", "1", "--rlhf.sft.eval_examples", "4",
               "--output_dir", str(out)]
    code, stdout = _ctrl_c_after_steps(command, out, env={**run_env(), "OMP_NUM_THREADS": "2"})
    assert code == INTERRUPT_EXIT_CODE, stdout[-3000:]
    assert "Traceback" not in stdout and "KeyboardInterrupt" not in stdout, stdout[-3000:]
    stage = json.loads((out / "sft" / "summary.json").read_text())
    assert 0 < stage["steps"] < 1000, stage
    assert (out / "sft" / "checkpoints" / f"step{stage['steps']:08d}" / "COMPLETE").is_file()
    pipeline = json.loads((out / "summary.json").read_text())
    assert pipeline["status"] == "interrupted" and "--resume" in pipeline["resume_hint"], pipeline
    assert f"continue with --output_dir {out} --resume" in stdout
