"""LoRA settings shared by pre-training/fine-tuning (`training.lora`) and RLHF (`rlhf.lora`)."""

from __future__ import annotations

from pydantic import Field

from ava.config.schema.base import WIDTH_MAX, Section

# The Ava model's linear layers that can take an adapter; MoE experts are stacked tensors and cannot.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRAConfig(Section):
    """LoRA adapters (through peft) on the policy; the base weights stay frozen."""

    enabled: bool = Field(False, description="Train LoRA adapters instead of every weight of the policy.")
    # A rank is at most the adapted layer's width; alpha / rank is the adapters' scale, usually 1 or 2, so alpha is
    # bounded like the rank.
    rank: int = Field(8, gt=0, le=WIDTH_MAX, description="Adapter rank r.")
    alpha: float = Field(16.0, gt=0, le=WIDTH_MAX, description="Adapter scale numerator: updates are scaled by alpha / r.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter input.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"], min_length=1,
        description="Linear layers to adapt, by name (attention: q_proj k_proj v_proj o_proj; dense FFN: "
                    "gate_proj up_proj down_proj).")


class TrainingLoRAConfig(LoRAConfig):
    """LoRA for `train.py`: which weights train besides the adapters.

    The switches exist because of the two ways a LoRA run goes wrong (the BEHRT
    troubleshooting guide): everything left trainable, so the run is full
    fine-tuning that overfits; or embeddings and output head frozen at their
    random initialisation while training from scratch, so nothing can be learnt.
    """

    freeze_base: bool = Field(
        True, description="Freeze every weight but the adapters (and the embeddings/head when switched on).")
    train_embeddings: bool = Field(
        False, description="Also train the token (and position) embeddings: needed when training from scratch.")
    train_head: bool = Field(
        False, description="Also train the output head and the final norm: needed when training from scratch.")
