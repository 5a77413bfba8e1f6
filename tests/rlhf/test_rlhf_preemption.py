"""An RLHF stage checkpoints inside itself: SIGTERM -> checkpoint -> exit 75 -> `--resume` continues that stage.

Run for real through `train_rlhf.py`: a short SFT, then PPO (actor, critic,
frozen reference) from the SFT policy. The stopped pipeline is resumed in
its output directory; SFT is not run again, PPO continues from its
checkpoint's step (not from its start), and every PPO step record equals
the uninterrupted pipeline's, bit for bit: the rollout RNG streams, the
prompt order, the KL controller and both optimizers were restored.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ava.train.runtime.preemption import REQUEUE_EXIT_CODE
from tests.conftest import REPO
from tests.rlhf.test_rlhf_pipeline import rlhf_env

pytestmark = pytest.mark.slow

PPO_STEPS = 24
PIPELINE = ["--config", "configs/gpu/tiny.yaml", "--hardware_config", "configs/hardware/cpu.yaml",
            "--rlhf_config", "configs/rlhf/test_cpu.yaml", "--hidden_size", "64", "--num_layers", "2",
            "--intermediate_size", "128", "--vocab_size", "257", "--max_position_embeddings", "64",
            "--max_length", "64", "--num_experts", "0", "--rlhf.stages", "[sft, ppo]", "--rlhf.sft.steps", "20",
            "--rlhf.sft.eval_examples", "4", "--rlhf.ppo.steps", str(PPO_STEPS), "--rlhf.ppo.logging_steps", "1",
            "--rlhf.ppo.rollout_batch_size", "8", "--rlhf.ppo.mini_batch_size", "8", "--rlhf.ppo.ppo_epochs", "1",
            "--rlhf.ppo.eval_prompts", "4", "--rlhf.ppo.kl_controller", "adaptive", "--rlhf.ppo.kl_target", "0.1",
            "--rlhf.ppo.normalize_rewards", "true"]


def _command(out: Path, *extra: str) -> list[str]:
    return [sys.executable, str(REPO / "train_rlhf.py"), *PIPELINE, "--output_dir", str(out), *extra]


def _ppo_steps(out: Path) -> list[dict]:
    """PPO's step records, without the timing share (the only field that depends on the machine's speed)."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in records if r.get("stage") == "ppo" and "event" not in r
             and not any(k.startswith("eval_") for k in r)]
    return [{k: v for k, v in r.items() if k != "generation_share"} for r in steps]


def _interrupt(command: list[str], ready, sig: int) -> tuple[int, str]:
    """Start the pipeline, send `sig` to its process group once `ready()` holds; its exit code and output."""
    proc = subprocess.Popen(command, cwd=REPO, env=rlhf_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        if ready():
            os.killpg(proc.pid, sig)
            break
        time.sleep(0.05)
    stdout, _ = proc.communicate(timeout=600)
    return proc.returncode, stdout


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("rlhf_reference") / "run"
    done = subprocess.run(_command(out), cwd=REPO, env=rlhf_env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    steps = _ppo_steps(out)
    assert [r["step"] for r in steps] == list(range(1, PPO_STEPS + 1))
    return steps


def test_sigterm_mid_ppo_checkpoints_exits_for_requeue_and_resume_continues_inside_the_stage(tmp_path, reference):
    out = tmp_path / "run"
    code, stdout = _interrupt(_command(out), lambda: (out / "metrics.jsonl").is_file() and len(_ppo_steps(out)) >= 3,
                              signal.SIGTERM)
    assert code == REQUEUE_EXIT_CODE, stdout[-4000:]
    stage = json.loads((out / "ppo" / "summary.json").read_text())
    stopped = stage["steps"]
    assert stage["status"] == "preempted" and 3 <= stopped < PPO_STEPS, stage
    point = out / "ppo" / "checkpoints" / f"step{stopped:08d}"
    assert (point / "COMPLETE").is_file()
    assert (point / "actor").is_dir() and (point / "critic").is_dir()  # both trained engines; the reference is not
    pipeline = json.loads((out / "summary.json").read_text())
    assert pipeline["status"] == "preempted" and "--resume" in pipeline["resume_hint"]
    assert not (out / "ppo" / "model").exists()

    resumed = subprocess.run(_command(out, "--resume"), cwd=REPO, env=rlhf_env(), capture_output=True, text=True,
                             timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-4000:] + resumed.stderr[-4000:]
    assert "sft: already completed" in resumed.stdout
    assert f"ppo: resuming inside the stage from {point}" in resumed.stdout
    assert f"ppo step {stopped + 1}/{PPO_STEPS}" in resumed.stdout and "ppo step 1/" not in resumed.stdout
    assert json.loads((out / "ppo" / "summary.json").read_text())["status"] == "completed"
    assert (out / "ppo" / "model" / "model.safetensors").is_file()
    assert not (out / "ppo" / "checkpoints").exists()  # a completed stage's model replaces its checkpoints
    assert _ppo_steps(out) == reference  # the stopped-and-resumed stage is the same stage, bit for bit


def test_a_stage_killed_outright_resumes_from_its_last_periodic_checkpoint(tmp_path, reference):
    out = tmp_path / "run"
    saved = out / "ppo" / "checkpoints" / "step00000005" / "COMPLETE"
    code, stdout = _interrupt(_command(out, "--rlhf.ppo.save_steps", "5"), saved.is_file, signal.SIGKILL)
    assert code == -signal.SIGKILL, stdout[-4000:]
    resumed = subprocess.run(_command(out, "--rlhf.ppo.save_steps", "5", "--auto_resume"), cwd=REPO, env=rlhf_env(),
                             capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-4000:] + resumed.stderr[-4000:]
    assert "ppo: resuming inside the stage from" in resumed.stdout
    # Steps logged after the checkpoint the kill left were dropped and logged again, once.
    assert _ppo_steps(out) == reference
