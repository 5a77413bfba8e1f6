"""The update gate under every ZeRO stage and precision: bad steps never touch the weights, good ones do.

One worker process (DeepSpeed state is process-global) builds an engine per
(stage 0-3, fp32/bf16) and drives it through: 4 healthy steps, a NaN
gradient (5), a 1000x gradient spike (6), a NaN loss (7), a checkpoint
save/load followed by a 4x spike that must be clipped (8), a healthy step (9).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO
from tests.train.run_helpers import free_port, run_env

pytestmark = pytest.mark.slow

CLIP = 0.05


@pytest.fixture(scope="module")
def cases() -> dict[tuple[int, str], dict]:
    result = subprocess.run([sys.executable, "tests/train/update_gate_worker.py", free_port()], cwd=REPO,
                            env=run_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    found = [json.loads(line[5:]) for line in result.stdout.splitlines() if line.startswith("CASE ")]
    return {(c["stage"], c["precision"]): c for c in found}


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_bad_steps_are_skipped_and_good_steps_apply(cases, stage, precision):
    steps = {s["step"]: s for s in cases[(stage, precision)]["steps"]}
    assert [steps[n]["kind"] for n in range(1, 10)] == (
        ["healthy"] * 4 + ["nonfinite", "explosion", "nonfinite"] + ["healthy"] * 2)
    for n, s in steps.items():
        assert s["weights_finite"], f"step {n}: non-finite weights"
        assert s["weights_changed"] == s["apply"] == s["adam_steps_changed"], f"step {n}: {s}"


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_judged_norm_is_the_pre_clip_norm_and_the_clip_set_is_the_clip_applied(cases, stage, precision):
    case = cases[(stage, precision)]
    steps = {s["step"]: s for s in case["steps"]}
    for n in (1, 2, 3, 4, 6, 8, 9):
        s = steps[n]
        # Per-layer norms (DeepSpeed's safe_get_full_grad) add up to the norm the gate judged.
        assert s["layer_norm_total"] == pytest.approx(s["grad_norm"], rel=1e-3)
        assert s["layers"] == [f"grad_norm/{n}" for n in ("embed", "head", "layers.0", "layers.1")]
    spike = steps[6]
    assert spike["grad_norm"] > 100 * steps[4]["grad_norm"]  # the 1000x spike, judged before clipping
    # After a checkpoint load the clip is set again: step 8's 4x spike (not an explosion) arrives clipped.
    assert steps[8]["grad_norm"] > CLIP and steps[8]["clipped_norm"] == pytest.approx(CLIP, rel=1e-3)
    for n in (1, 2, 3, 4, 8, 9):
        assert steps[n]["clipped_norm"] <= CLIP * (1 + 1e-3)
        assert 0 < steps[n]["update_ratio"] < 1


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_an_explosion_reduces_the_lr_until_the_cooldown_ends(cases, stage):
    case = cases[(stage, "fp32")]
    scales = [s["lr_scale"] for s in case["steps"]]
    assert scales == [1.0] * 5 + [0.5, 0.5, 0.5, 1.0]  # cool-down of 2 healthy steps: 8 and 9
    assert case["events"] == ["nonfinite_gradient", "gradient_explosion", "lr_reduced", "nonfinite_gradient",
                              "lr_restored"]
