"""The gradient-health monitor under the real launcher: 2 ranks, ZeRO-1, 2 and 3, faults injected by env var.

Each run (18 steps, a checkpoint every step, a log line every step) gets:
a 1000x gradient spike at step 7 (after a 4-step baseline warm-up), a NaN
loss on rank 1 only at step 10, and NaN gradients at steps 13-15. Expected:
the spike is an explosion (update skipped, LR halved, restored after a
2-step cool-down); the NaN steps leave the master weights bit for bit as they
were; the third bad step in a row rolls back to the checkpoint of step 12
(the last healthy one), and the run then finishes all 18 steps.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ava.train.engine.lr_schedule import LRSchedule
from tests.conftest import REPO
from tests.train.run_helpers import SMALL_RUN, TINY, free_port, run_env

pytestmark = pytest.mark.slow

STEPS = 18
FAULTS = "grad_spike@7,nan_loss@10:rank1,nan_grad@13-15"
HEALTH = {"baseline_warmup_steps": 4, "lr_cooldown_steps": 2, "max_consecutive_bad_steps": 3,
          "initial_clip_value": 2.0, "final_clip_value": 1.0, "warmup_steps": 10}
RUN = [*TINY, *SMALL_RUN, "--hidden_size", "64", "--num_layers", "2", "--intermediate_size", "128",
       "--vocab_size", "128", "--max_steps", str(STEPS), "--save_steps", "1", "--keep_last_checkpoints", "40",
       "--logging_steps", "1", "--eval_strategy", "no", "--sample_max_new_tokens", "0", "--batch_size", "2",
       "--deepspeed.train_batch_size", "4", "--num_gpus", "2", "--cpu_offload", "false", "--mixed_precision", "bf16",
       "--warmup_steps", "2", "--learning_rate", "1e-3", "--lr_end", "1e-4",
       *[f"--training.gradient_health.{k}={v}" for k, v in HEALTH.items()]]


def _run(out: Path, stage: str) -> list[dict]:
    launcher = shutil.which("deepspeed") or str(Path(sys.executable).with_name("deepspeed"))
    command = [launcher, "--num_gpus", "2", "--master_port", free_port(), "train.py", *RUN,
               "--distributed_config", f"configs/distributed/{stage}.yaml", "--output_dir", str(out)]
    result = subprocess.run(command, cwd=REPO, env={**run_env(), "AVA_INJECT_FAULTS": FAULTS},
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for line in ("gradient explosion at step 7", "rollback at step 15", "NaN/Inf: update skipped"):
        assert line in result.stdout, f"{line!r} not on the console"
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("stage", ["deepspeed_zero1", "deepspeed_zero2", "deepspeed_zero3"])
def test_spikes_and_nans_are_skipped_the_lr_recovers_and_a_rollback_lets_the_run_finish(stage, tmp_path):
    out = tmp_path / "run"
    records = _run(out, stage)
    events = [(r["step"], r["event"]) for r in records if "event" in r]
    assert events == [(7, "gradient_explosion"), (7, "lr_reduced"), (9, "lr_restored"),
                      (10, "nonfinite_gradient"), (13, "nonfinite_gradient"), (14, "nonfinite_gradient"),
                      (15, "nonfinite_gradient"), (15, "rollback"), (15, "lr_reduced"), (14, "lr_restored")]
    rollback = next(r for r in records if r.get("event") == "rollback")
    assert rollback["to_step"] == 12

    steps = [r for r in records if "loss" in r]
    # 18 steps, then steps 13-15 again after the rollback: every step logged once per attempt.
    assert [r["step"] for r in steps] == [*range(1, 16), *range(13, STEPS + 1)]
    first = {r["step"]: r for r in steps[:15]}
    replay = {r["step"]: r for r in steps[15:]}

    # Skipped steps leave the master weights exactly as the step before left them; applied steps move them.
    for bad in (7, 10, 13, 14, 15):
        assert first[bad]["update_applied"] is False
        assert first[bad]["weight_norm"] == first[bad - 1]["weight_norm"], f"step {bad} changed the weights"
    for good in (6, 8, 9, 11, 12):
        assert first[good]["update_applied"] is True and first[good]["weight_norm"] != first[good - 1]["weight_norm"]
    # The rollback restored step 12's weights: the replayed step 13 starts from them.
    assert replay[13]["update_applied"] is True

    # LR: the schedule, halved for the explosion's cool-down (steps 8, 9) and the rollback's (13, 14).
    schedule = LRSchedule(peak=1e-3, end=1e-4, warmup_steps=2, total_steps=STEPS)
    for record in steps:
        step = record["step"]
        halved = step in (8, 9) and record is first.get(step) or step in (13, 14) and record is replay.get(step)
        assert record["lr"] == pytest.approx(schedule.lr(step - 1) * (0.5 if halved else 1.0), rel=1e-12), step
        clip = 2.0 + (1.0 - 2.0) * min(1.0, (step - 1) / 10)
        assert record["clip"] == pytest.approx(clip, rel=1e-12), step

    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == STEPS and summary["checks_passed"]
    assert summary["gradient_health"]["counts"]["skipped_steps"] == 5
    assert summary["gradient_health"]["rollbacks"] == 1
    saved = sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step"))
    assert not {"step00000007", "step00000010"} & set(saved)  # no checkpoint of a skipped step
