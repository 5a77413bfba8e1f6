"""The `deepspeed:` section: ZeRO stage, offload, batch and optimizer settings.

Batch sizes, precision and optimizer hyperparameters here are alternative
names for `training:` keys (the guide uses both); `ava.config.aliases`
resolves them into one value before validation.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from ava.config.schema.base import (
    BATCH_MAX,
    COUNT_MAX,
    ELEMENTS_MAX,
    EXPERTS_MAX,
    LR_MAX,
    Section,
    WholeNumber,
)
from ava.config.schema.training import WEIGHT_DECAY_MAX, Precision

Beta = Annotated[float, Field(ge=0, lt=1)]
"""An Adam beta: an exponential-average decay, as training.beta1 and beta2."""
# Transformer Engine scales by 2^-margin in float32, whose normal range ends at 2^-126.
FP8_MARGIN_MAX = 126


class OptimizerParams(Section):
    """Optimizer hyperparameters; each is the same value as a training.* key."""

    lr: float | None = Field(None, gt=0, le=LR_MAX, description="Same value as training.learning_rate.")
    betas: list[Beta] | None = Field(None, min_length=2, max_length=2,
                                     description="Same values as [training.beta1, training.beta2].")
    eps: float | None = Field(None, gt=0, le=1, description="Same value as training.eps.")
    weight_decay: float | None = Field(None, ge=0, le=WEIGHT_DECAY_MAX, description="Same value as training.weight_decay.")


class OptimizerConfig(Section):
    """Which optimizer DeepSpeed builds."""

    type: Literal["AdamW", "Adam"] = Field("AdamW", description="Optimizer (decoupled weight decay for AdamW).")
    params: OptimizerParams = Field(default_factory=OptimizerParams)


class DeepSpeedSection(Section):
    """DeepSpeed engine settings."""

    enabled: bool = Field(True, description="Train through a DeepSpeed engine.")
    zero_stage: Literal[0, 1, 2, 3] = Field(
        0, description="ZeRO stage: 1 partitions optimizer state, 2 also gradients, 3 also parameters.")
    cpu_offload: bool = Field(False, description="Offload optimizer state (and parameters at stage 3) to CPU.")
    nvme_offload: bool = Field(False, description="Offload parameters and optimizer state to NVMe (stage 3).")
    nvme_path: str | None = Field(None, description="Directory on an NVMe drive for nvme_offload.")
    precision: Precision | None = Field(None, description="Same value as training.mixed_precision.")

    gradient_accumulation_steps: int | None = Field(
        None, gt=0, le=BATCH_MAX, description="Same value as training.gradient_accumulation_steps.")
    train_batch_size: int | None = Field(
        None, gt=0, le=COUNT_MAX, description="Global batch: micro batch x accumulation x data-parallel ranks.")
    micro_batch_size: int | None = Field(None, gt=0, le=BATCH_MAX, description="Same value as training.batch_size.")

    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    ep_size: int = Field(
        1, gt=0, le=EXPERTS_MAX, description="Expert-parallel ranks: each holds num_experts / ep_size experts (ZeRO 0-2).")

    overlap_comm: bool = Field(True, description="Overlap gradient reduction with backward.")
    contiguous_gradients: bool = Field(True, description="Copy gradients into a contiguous buffer.")
    allgather_bucket_size: WholeNumber = Field(int(5e8), le=ELEMENTS_MAX, description="Elements per allgather bucket.")
    reduce_bucket_size: WholeNumber = Field(int(5e8), le=ELEMENTS_MAX, description="Elements per reduce bucket.")
    stage3_prefetch_bucket_size: WholeNumber = Field(int(5e8), le=ELEMENTS_MAX, description="Elements prefetched (stage 3).")
    stage3_param_persistence_threshold: WholeNumber = Field(
        int(1e6), le=ELEMENTS_MAX, description="Parameters smaller than this stay unpartitioned (stage 3).")
    stage3_max_live_parameters: WholeNumber = Field(
        int(1e9), le=ELEMENTS_MAX, description="Parameters kept gathered at once (stage 3).")

    fp8_enabled: bool | None = Field(None, description="Must agree with precision: fp8 when true.")
    fp8_margin: int = Field(0, ge=0, le=FP8_MARGIN_MAX, description="FP8 scaling margin (Transformer Engine DelayedScaling).")
    fp8_recipe: Literal["tensorwise", "rowwise"] = Field(
        "tensorwise", description="torchao float8 scaling: one scale per tensor, or one per row (more accurate).")
    fp8_backend: Literal["torchao", "transformer_engine"] = Field(
        "torchao", description="FP8 implementation: torchao float8 training, or NVIDIA Transformer Engine (GPU).")
    fp8_interval: int | None = Field(None, ge=1, le=COUNT_MAX, description="Deprecated: has no effect in current libraries.")

    steps_per_print: int = Field(1000000, gt=0, le=COUNT_MAX, description="DeepSpeed's own progress print interval.")
