"""The `quantization:` rules that involve other sections: what NVFP4 training cannot be combined with."""

from __future__ import annotations

from ava.config.check_context import CheckContext
from ava.config.schema import DeepSpeedSection, QuantizationConfig, TrainingConfig


def check_quantization(ctx: CheckContext) -> None:
    """fp8, ZeRO-3, LoRA and RLHF stages with `quantization.format` set."""
    q, t, ds = ctx.sections["quantization"], ctx.sections["training"], ctx.sections["deepspeed"]
    assert isinstance(q, QuantizationConfig) and isinstance(t, TrainingConfig) and isinstance(ds, DeepSpeedSection)
    if not q.enabled:
        return
    key, name = "quantization.format", q.format.upper()
    if t.mixed_precision == "fp8":
        ctx.problem(key, f"{name} quantization and training.mixed_precision: fp8 "
                    f"({ctx.where('training.mixed_precision')}) would both rewrite the same Linear layers' matmuls",
                    "train in bf16 or fp32 (training.mixed_precision) with quantization, or set "
                    "quantization.format: none", q.format)
    if ds.zero_stage == 3:
        ctx.problem(key, f"{name} quantization needs each rank to hold whole weights, but deepspeed.zero_stage is 3 "
                    f"({ctx.where('deepspeed.zero_stage')}): the end-of-run conversion quantizes every Linear "
                    "layer's full weight in place, and ZeRO-3 leaves each rank only a shard",
                    "use deepspeed.zero_stage 0, 1 or 2 with quantization", q.format)
    if t.lora.enabled:
        ctx.problem(key, f"{name} quantization with training.lora.enabled ({ctx.where('training.lora.enabled')}): "
                    "LoRA wraps the same Linear layers, and quantizing a frozen base under adapters (QLoRA) is "
                    "not supported", "set training.lora.enabled: false, or quantization.format: none", q.format)
    if ctx.sections.get("rlhf") is not None:
        ctx.problem(key, f"{name} quantization applies to pre-training runs (train.py); the RLHF stages do not "
                    "fake-quantize or convert their models", "set quantization.format: none for RLHF", q.format)
