"""What the GPU check runs: the models, the training runs' arguments, and the FLOP and MFU arithmetic.

Standard library only, like the rest of the orchestrator: it runs before the wheels are installed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

CUDA_TESTS = ["tests/train/test_run_info.py", "tests/train/test_precision.py", "tests/model/test_compiled_blocks.py"]
DRY_TESTS = ["tests/train/test_run_info.py"]

# Datasheet dense (no sparsity) tensor-core peaks, FLOP/s: (name pattern, label, bf16, fp8). First match wins.
DATASHEET_PEAKS = [
    (r"H100.*PCIe", "H100 PCIe", 756e12, 1513e12),
    (r"H100.*NVL", "H100 NVL", 835e12, 1671e12),
    (r"H100|H200|GH200", "H100/H200 SXM", 989.4e12, 1978.9e12),
    (r"A100", "A100", 312e12, None),
]


@dataclass(frozen=True)
class ModelDims:
    """What the FLOP count needs; the same numbers are passed to train.py as overrides."""

    layers: int
    hidden: int
    heads: int
    ffn: int
    vocab: int
    seq: int
    batch: int
    experts: int = 1  # 1: a dense FFN
    top_k: int = 1

    def overrides(self) -> list[str]:
        return ["--num_layers", str(self.layers), "--hidden_size", str(self.hidden),
                "--num_attention_heads", str(self.heads), "--intermediate_size", str(self.ffn),
                "--vocab_size", str(self.vocab), "--max_length", str(self.seq), "--batch_size", str(self.batch),
                "--num_experts", str(self.experts), "--num_experts_per_token", str(self.top_k)]


def training_flops_per_token(d: ModelDims, kv_heads: int | None = None) -> float:
    """6 x the matmul parameters a token passes through + 12 x layers x seq x hidden, by hand.

    The PaLM/Chinchilla count `ava model summary` uses: 2 FLOPs per multiply-add,
    training = 3 x forward; attention's QK^T and AV over the full seq x seq square
    (4 x seq x hidden per layer forward). The embedding is a lookup and counts
    nothing; the output head is untied; an MoE layer runs top_k SwiGLU experts
    and a router of hidden x experts; norms are left out.
    """
    head_dim = d.hidden // d.heads
    attention = 2 * d.hidden * d.hidden + 2 * d.hidden * (kv_heads or d.heads) * head_dim  # q, o; k, v
    ffn = 3 * d.hidden * d.ffn * (d.top_k if d.experts > 1 else 1) + (d.hidden * d.experts if d.experts > 1 else 0)
    matmul = d.layers * (attention + ffn) + d.hidden * d.vocab
    return 6.0 * matmul + 12.0 * d.layers * d.seq * d.hidden


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops: float | None) -> float | None:
    """Model FLOPs utilisation: achieved model FLOP/s over the peak."""
    if not peak_flops or tokens_per_s is None or flops_per_token is None:
        return None
    return tokens_per_s * flops_per_token / peak_flops


def datasheet_peak(gpu_name: str | None) -> dict[str, Any] | None:
    for pattern, label, bf16, fp8 in DATASHEET_PEAKS:
        if gpu_name and re.search(pattern, gpu_name):
            return {"bf16_flops": bf16, "fp8_flops": fp8, "source": f"{label} datasheet, dense"}
    return None


@dataclass(frozen=True)
class TrainSpec:
    name: str
    dims: ModelDims
    precision: str
    base: tuple[str, ...]  # config flags before the overrides


@dataclass
class Plan:
    """What a mode runs: the GPU check, or its CPU stand-ins."""

    dry_run: bool
    steps: int
    logging_steps: int
    tests: list[str]
    trains: list[TrainSpec] = field(default_factory=list)


def make_plan(dry_run: bool, steps: int | None = None) -> Plan:
    if dry_run:
        base = ("--config", "configs/gpu/tiny.yaml", "--hardware_config", "configs/hardware/cpu.yaml")
        dense = ModelDims(layers=1, hidden=64, heads=2, ffn=128, vocab=512, seq=32, batch=2)
        moe = ModelDims(layers=1, hidden=64, heads=2, ffn=128, vocab=512, seq=32, batch=2, experts=4, top_k=2)
        plan = Plan(True, steps or 2, 1, DRY_TESTS)
    else:
        base = ("--config", "configs/gpu/base.yaml", "--gradient_checkpointing", "false")
        # 0.40B parameters outside the embedding (0.54B in all): RESULTS.md's dense GPU model.
        dense = ModelDims(layers=24, hidden=1024, heads=16, ffn=4096, vocab=65536, seq=2048, batch=8)
        # base.yaml's MoE (16 experts, top-2, hidden 768) at 4 of its 16 layers: 0.56B, 0.17B active.
        moe = ModelDims(layers=4, hidden=768, heads=12, ffn=3072, vocab=65536, seq=2048, batch=8, experts=16, top_k=2)
        plan = Plan(False, steps or 30, 5, CUDA_TESTS)
    # The dense pair first: if the budget runs out, bf16 against fp8 on one model is what is left.
    plan.trains = [TrainSpec("train_dense_bf16", dense, "bf16", base), TrainSpec("train_dense_fp8", dense, "fp8", base),
                   TrainSpec("train_moe_bf16", moe, "bf16", base), TrainSpec("train_moe_fp8", moe, "fp8", base)]
    return plan


def train_args(spec: TrainSpec, plan: Plan) -> list[str]:
    """train.py's arguments for `spec`, less --output_dir: a short run, no evaluation, one final checkpoint.

    The final checkpoint cannot be turned off (save_strategy: no still saves at
    the end, and reloads it to check it); it is deleted after the stage.
    """
    return [*spec.base, *spec.dims.overrides(), "--mixed_precision", spec.precision,
            "--gradient_accumulation_steps", "1", "--max_steps", str(plan.steps),
            "--warmup_steps", str(max(1, plan.steps // 6)), "--logging_steps", str(plan.logging_steps),
            "--eval_strategy", "no", "--save_strategy", "no", "--sample_max_new_tokens", "0",
            "--max_eval_examples", "64", "--keep_last_checkpoints", "1"]


def stage_names(plan: Plan) -> list[str]:
    return ["environment", "wheels", "imports", "cuda_tests", "deepspeed_ops", *[t.name for t in plan.trains]]

