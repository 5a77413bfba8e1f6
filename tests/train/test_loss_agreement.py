"""Two DeepSpeed ranks train the same model as one process does: ZeRO-1, 2 and 3, dense and dropless MoE.

Each 2-rank run (real `deepspeed` launcher, gloo on CPU) uses micro batch 2 x
accumulation 2 x 2 ranks; its single-process reference uses micro batch 2 x
accumulation 4, so every optimizer step sees the same 8 sequences split into
the same micro batches. The per-step losses of the global batch must then
agree: to 1e-5 relative in fp32 (only the order of the sums differs) and to
2e-2 in bf16.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.train.run_helpers import TINY, free_port, run_env

pytestmark = pytest.mark.slow

STEPS = 8
MODEL = {
    "dense": ["--num_experts", "0"],
    "moe": ["--num_experts", "4", "--num_experts_per_token", "2", "--expert_capacity_factor", "0"],
}
COMMON = ["--builtin_dataset", "markov", "--markov_vocab_size", "64", "--vocab_size", "64", "--max_length", "32",
          "--hidden_size", "64", "--num_layers", "2", "--num_attention_heads", "4", "--intermediate_size", "128",
          "--max_train_examples", "64", "--max_eval_examples", "16", "--eval_batch_size", "4",
          "--warmup_steps", "2", "--learning_rate", "1e-2", "--lr_end", "1e-3", "--logging_steps", "1",
          "--eval_strategy", "no", "--sample_max_new_tokens", "0",
          "--save_strategy", "no", "--max_steps", str(STEPS), "--batch_size", "2", "--cpu_offload", "false"]
TOLERANCE = {"fp32": 1e-5, "bf16": 2e-2}


def _losses(out: Path) -> list[float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def _run(out: Path, model: str, precision: str, stage: str | None, ep_size: int = 1) -> list[float]:
    flags = [*TINY, *COMMON, *MODEL[model], "--mixed_precision", precision, "--output_dir", str(out),
             "--ep_size", str(ep_size)]
    if stage is None:  # the single-process reference: plain data parallelism of one
        command = [sys.executable, "train.py", *flags, "--gradient_accumulation_steps", "4"]
    else:
        launcher = shutil.which("deepspeed") or str(Path(sys.executable).with_name("deepspeed"))
        if not Path(launcher).exists():
            pytest.fail("the deepspeed launcher is not installed next to this Python; run `make setup`")
        port = free_port()
        command = [launcher, "--num_gpus", "2", "--master_port", port, "train.py", *flags,
                   "--distributed_config", f"configs/distributed/{stage}.yaml", "--deepspeed.train_batch_size", "8",
                   "--num_gpus", "2"]
    result = subprocess.run(command, cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    if stage is not None:  # DeepSpeed's CPU all-reduce buffers (70 MB per rank) must not outlive the run
        assert not [p for p in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*")]
    losses = _losses(out)
    assert len(losses) == STEPS
    summary = json.loads((out / "summary.json").read_text())
    assert summary["checks_passed"], summary["checks"]  # incl. reload of the final checkpoint and export
    return losses


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Single-process loss trajectories, computed once per (model, precision)."""
    cache: dict[tuple[str, str], list[float]] = {}

    def get(model: str, precision: str) -> list[float]:
        if (model, precision) not in cache:
            out = tmp_path_factory.mktemp(f"ref-{model}-{precision}") / "run"
            cache[model, precision] = _run(out, model, precision, None)
        return cache[model, precision]

    return get


@pytest.mark.parametrize(("stage", "model", "precision", "ep_size"), [
    ("deepspeed_zero1", "dense", "fp32", 1), ("deepspeed_zero1", "moe", "fp32", 1),
    ("deepspeed_zero2", "dense", "fp32", 1), ("deepspeed_zero2", "moe", "fp32", 1),
    ("deepspeed_zero3", "dense", "fp32", 1), ("deepspeed_zero3", "moe", "fp32", 1),
    ("deepspeed_zero2", "moe", "bf16", 1),
    ("deepspeed_zero2", "moe", "fp32", 2),  # ZeRO-1 with ep_size 2: tests/model/test_expert_parallel.py
])
def test_two_ranks_follow_the_single_process_loss_trajectory(stage, model, precision, ep_size, reference, tmp_path):
    """ep_size 2: each rank holds 2 of the 4 experts and tokens cross ranks by all-to-all."""
    expected = reference(model, precision)
    got = _run(tmp_path / "run", model, precision, stage, ep_size)
    assert min(expected[1:]) < expected[0] - 0.03, f"the reference run did not learn: {expected}"
    worst = max(abs(a - b) / abs(b) for a, b in zip(got, expected, strict=True))
    assert worst <= TOLERANCE[precision], (
        f"{stage} {model} {precision} ep_size {ep_size}: worst relative loss difference {worst:.2e} over {STEPS} steps "
        f"(bound {TOLERANCE[precision]:.0e})\n2 ranks: {got}\n1 process: {expected}")
