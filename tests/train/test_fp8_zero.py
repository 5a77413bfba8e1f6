"""FP8 training (torchao, on top of bf16) under ZeRO-1, 2 and 3 on 2 DeepSpeed ranks follows bf16 training.

A tiny dropless MoE (every width a multiple of 16, so attention and experts
run in FP8) trains for the same steps on the same batches in bf16, fp8
tensorwise and fp8 rowwise under each ZeRO stage, plus fp8 with the experts
split over the 2 ranks (expert parallelism). FP8 rounds every matmul operand
to 3 mantissa bits, so the trajectories differ step by step, but the final
loss must stay within 2% of bf16's and every run must learn.

All those runs share one launch of the real `deepspeed` launcher
(fp8_zero_worker.py runs `train()` once per configuration, resolved as
train.py resolves it); one more launch of train.py itself checks that a run's
outputs record the precision it trained in.
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

WORKER = Path(__file__).with_name("fp8_zero_worker.py")
STEPS = 24
MODEL = ["--builtin_dataset", "markov", "--markov_vocab_size", "64", "--vocab_size", "64", "--max_length", "32",
         "--hidden_size", "64", "--num_layers", "2", "--num_attention_heads", "4", "--intermediate_size", "128",
         "--num_experts", "4", "--num_experts_per_token", "2", "--expert_capacity_factor", "0"]
RUN = ["--max_train_examples", "512", "--warmup_steps", "2", "--learning_rate", "1e-2", "--lr_end", "1e-3",
       "--logging_steps", "1", "--eval_strategy", "no", "--sample_max_new_tokens", "0", "--save_strategy", "no",
       "--batch_size", "2", "--cpu_offload", "false", "--deepspeed.train_batch_size", "8"]
STAGES = ("zero1", "zero2", "zero3")
PRECISIONS = {"bf16": ["--mixed_precision", "bf16"],
              "tensorwise": ["--mixed_precision", "fp8", "--fp8_recipe", "tensorwise"],
              "rowwise": ["--mixed_precision", "fp8", "--fp8_recipe", "rowwise"]}
TOLERANCE = 0.02  # final loss, relative to bf16's


def _launcher() -> str:
    launcher = shutil.which("deepspeed") or str(Path(sys.executable).with_name("deepspeed"))
    if not Path(launcher).exists():
        pytest.fail("the deepspeed launcher is not installed next to this Python; run `make setup`")
    return launcher


def _distributed(stage: str) -> str:
    return f"configs/distributed/deepspeed_{stage}.yaml"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, dict]:
    """Every run's per-step losses and precision report, by name ("zero2-rowwise", "zero2-tensorwise-ep2")."""
    specs = [{"name": f"{stage}-{name}", "distributed_config": _distributed(stage), "overrides": flags}
             for stage in STAGES for name, flags in PRECISIONS.items()]
    specs.append({"name": "zero2-tensorwise-ep2", "distributed_config": _distributed("zero2"),
                  "overrides": [*PRECISIONS["tensorwise"], "--ep_size", "2"]})
    work = tmp_path_factory.mktemp("fp8-zero")
    job = work / "job.json"
    job.write_text(json.dumps({"config": TINY[1], "hardware_config": TINY[3], "runs": specs,
                               "overrides": [*MODEL, *RUN, "--max_steps", str(STEPS)]}))
    port = free_port()
    proc = subprocess.run([_launcher(), "--num_gpus", "2", "--master_port", port, str(WORKER), str(job)],
                          cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0 and (work / "results.json").is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    results = {r["name"]: r for r in json.loads((work / "results.json").read_text())}
    for name, r in results.items():
        assert r["status"] == "completed" and len(r["losses"]) == STEPS, (name, r)
    return results


@pytest.mark.parametrize("stage", STAGES)
def test_every_precision_learns_under_each_zero_stage(runs, stage):
    for name in PRECISIONS:
        losses = runs[f"{stage}-{name}"]["losses"]
        first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4  # means of 4: single steps are noisy
        assert last < first - 0.05, f"{stage} {name} did not learn: {losses}"


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
@pytest.mark.parametrize("stage", STAGES)
def test_fp8_final_loss_is_within_2_percent_of_bf16(runs, stage, recipe):
    bf16, fp8 = runs[f"{stage}-bf16"], runs[f"{stage}-{recipe}"]
    assert bf16["precision"]["precision"] == "bf16" and bf16["precision"]["fp8_modules"] == 0
    assert fp8["precision"]["precision"] == "fp8" and fp8["precision"]["recipe"] == recipe
    assert fp8["precision"]["fp8_modules"] == 10  # q, k, v, o and the experts of both layers
    assert fp8["losses"] != bf16["losses"]  # FP8 really ran: its rounding changes the trajectory
    got, expected = fp8["losses"][-1], bf16["losses"][-1]
    assert abs(got - expected) / expected <= TOLERANCE, (
        f"{stage} fp8 {recipe}: final loss {got:.4f} vs bf16 {expected:.4f}\nfp8: {fp8['losses']}\n"
        f"bf16: {bf16['losses']}")


def test_fp8_experts_train_under_expert_parallelism(runs):
    """Each rank holds 2 of the 4 experts and runs them in FP8 on the rows both ranks send it."""
    ep, bf16 = runs["zero2-tensorwise-ep2"], runs["zero2-bf16"]
    assert ep["precision"]["fp8_modules"] == 10
    assert abs(ep["losses"][-1] - bf16["losses"][-1]) / bf16["losses"][-1] <= TOLERANCE
    assert sum(ep["losses"][-4:]) / 4 < sum(ep["losses"][:4]) / 4 - 0.05


def test_train_py_records_fp8_in_its_outputs(tmp_path):
    """summary.json says what the run trained in, and the start of the run says that FP8 is emulated on CPU."""
    out = tmp_path / "run"
    port = free_port()
    command = [_launcher(), "--num_gpus", "2", "--master_port", port, "train.py", *TINY, *MODEL, *RUN,
               *PRECISIONS["rowwise"], "--max_steps", "4", "--output_dir", str(out),
               "--distributed_config", _distributed("zero3"), "--num_gpus", "2"]
    result = subprocess.run(command, cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["checks_passed"], summary["checks"]  # incl. reload of the final checkpoint and export
    recorded = summary["precision"]
    assert (recorded["precision"], recorded["backend"], recorded["recipe"]) == ("fp8", "torchao", "rowwise")
    assert recorded["emulated"] and recorded["fp8_modules"] == 10
    assert "FP8 matmuls are emulated" in result.stdout + result.stderr
    assert "Failed to load" not in result.stdout + result.stderr  # torchao's import noise stays hidden
