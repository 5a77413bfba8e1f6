"""The LoRA rules shared by `training.lora` and `rlhf.lora`: adapters only fit linear layers."""

from __future__ import annotations

from ava.config.check_context import CheckContext
from ava.config.schema import ModelConfig
from ava.config.schema.lora import LORA_TARGETS, LoRAConfig


def check_lora_targets(ctx: CheckContext, section: str, lora: LoRAConfig, model: ModelConfig) -> None:
    """Unknown target names, and FFN targets on an MoE model (its experts are stacked tensors)."""
    key = f"{section}.target_modules"
    ffn = [t for t in lora.target_modules if t in ("gate_proj", "up_proj", "down_proj")]
    if ffn and model.is_moe and not model.shared_expert_intermediate_size:
        ctx.problem(key, f"{', '.join(ffn)}: this MoE model's FFNs are experts, stacked tensors rather than linear "
                    "layers, so nothing would be adapted there",
                    "target the attention layers (q_proj, k_proj, v_proj, o_proj)", lora.target_modules)
    stacked = [t for t in lora.target_modules if t in ("q_proj", "o_proj")]
    if stacked and model.use_moa:
        ctx.problem(key, f"{', '.join(stacked)}: with model.use_moa the MoA layers' query and output projections are "
                    "stacked per-expert tensors, not linear layers, so those layers would get no adapter there",
                    "target k_proj and v_proj (the projections the attention experts share), or set use_moa: false",
                    lora.target_modules)
    unknown = [t for t in lora.target_modules if t not in LORA_TARGETS]
    if unknown:
        ctx.problem(key, f"{', '.join(map(repr, unknown))} not a linear layer of the Ava model (MoE experts are "
                    "stacked tensors, not linear layers, and take no adapter)",
                    f"choose from {', '.join(LORA_TARGETS)}", lora.target_modules)
