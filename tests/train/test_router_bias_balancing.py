"""aux_loss_free routing: the trainer moves every MoE layer's expert bias after each applied step."""

from __future__ import annotations

import subprocess
import sys

import torch

from tests.conftest import REPO
from tests.train.run_helpers import SMALL_RUN, TINY, run_env

STEPS, RATE = 12, 0.01


def test_expert_biases_move_by_the_update_rate_once_per_step(tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "run"
    result = subprocess.run([sys.executable, "train.py", *TINY, *SMALL_RUN, "--max_steps", str(STEPS),
                             "--router_type", "aux_loss_free", "--router_bias_update_rate", str(RATE),
                             "--hidden_size", "64", "--num_layers", "2", "--intermediate_size", "64",
                             "--eval_strategy", "no", "--output_dir", str(out)],
                            cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    weights = load_file(str(out / "model" / "model.safetensors"))
    biases = [v for k, v in weights.items() if k.endswith("router.expert_bias")]
    assert len(biases) == 2
    for bias in biases:
        steps_taken = bias / RATE  # each step adds +-RATE (or 0 for an expert at exactly the mean load)
        assert torch.allclose(steps_taken, steps_taken.round(), atol=1e-3)
        assert bias.abs().max() <= STEPS * RATE + 1e-6
        assert bias.abs().sum() > 0  # they moved: the trainer applied the update
