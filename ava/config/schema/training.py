"""The `training:` section: optimisation, schedule, precision, evaluation and saving."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ava.config.schema.base import (
    BATCH_MAX,
    CLIP_MAX,
    COEF_MAX,
    COUNT_MAX,
    ITEMS_MAX,
    LR_MAX,
    TOKENS_MAX,
    WORKERS_MAX,
    Section,
)
from ava.config.schema.lora import TrainingLoRAConfig

Precision = Literal["fp32", "fp16", "bf16", "fp8"]

# AdamW shrinks each weight by lr x weight_decay per step: past 10, even an LR of 1e-3 would shrink every weight by
# 1% a step, faster than any update can replace it (typical: 0 to 0.1).
WEIGHT_DECAY_MAX = 10.0
# A language model's loss starts near ln(vocab_size), under 17 nats for any vocabulary: a required decrease of more
# than 100 nats could never be met.
LOSS_MAX = 100.0


class GradientHealthConfig(Section):
    """Adaptive clipping, explosion detection and automatic LR reduction."""

    enabled: bool = Field(True, description="Turn the gradient-health monitor on.")
    initial_clip_value: float = Field(2.0, gt=0, le=CLIP_MAX, description="Clip threshold at step 0.")
    final_clip_value: float = Field(0.5, gt=0, le=CLIP_MAX, description="Clip threshold after warmup_steps.")
    warmup_steps: int = Field(2000, ge=0, le=COUNT_MAX, description="Steps over which the clip threshold anneals.")
    explosion_threshold: float = Field(
        5.0, gt=1, le=CLIP_MAX, description="A gradient norm this many times the running baseline is an explosion.")
    auto_reduce_lr: bool = Field(True, description="Reduce the learning rate after an explosion.")
    lr_reduction_factor: float = Field(0.5, gt=0, lt=1, description="Multiplier applied to the LR on explosion.")
    lr_cooldown_steps: int = Field(
        100, ge=1, le=COUNT_MAX, description="Steps the reduced LR lasts after the last explosion before it is restored.")
    baseline: Literal["ema", "median"] = Field(
        "ema", description="Running baseline of healthy gradient norms: exponential average or median.")
    baseline_window: int = Field(
        100, ge=2, le=ITEMS_MAX, description="Healthy steps the baseline spans (EMA span, or median window).")
    baseline_warmup_steps: int = Field(
        20, ge=1, le=COUNT_MAX, description="Healthy steps seen before explosion detection starts.")
    max_consecutive_bad_steps: int = Field(
        5, ge=0, le=COUNT_MAX, description="Skipped steps in a row that roll back to the last checkpoint; 0 never rolls back.")
    max_rollbacks: int = Field(3, ge=0, le=COUNT_MAX, description="Rollbacks allowed before the run stops as failed.")
    layer_grad_norms: bool = Field(
        True, description="Log per-layer gradient norms and the update-to-weight ratio on logging steps.")


class TrainingConfig(Section):
    """How the model is optimised."""

    batch_size: int = Field(8, gt=0, le=BATCH_MAX, description="Per-device micro batch (sequences per forward pass).")
    gradient_accumulation_steps: int = Field(1, gt=0, le=BATCH_MAX, description="Micro batches per optimizer step.")

    learning_rate: float = Field(4.2e-4, gt=0, le=LR_MAX, description="Peak learning rate (after warmup).")
    weight_decay: float = Field(0.1, ge=0, le=WEIGHT_DECAY_MAX, description="AdamW decoupled weight decay.")
    weight_decay_exclude: list[Literal["norms", "biases", "embeddings"]] = Field(
        ["norms", "biases"], description="Parameters left out of weight decay: norms (norm weights and other 1-D "
        "gains and gates), biases, embeddings (token/position tables). The default decays the matrices only, as "
        "nanoGPT, Hugging Face and Megatron do; [] decays everything.")
    beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1.")
    beta2: float = Field(0.95, ge=0, lt=1, description="AdamW beta2.")
    # Past 1, epsilon outweighs the root mean square of any gradient and Adam turns into plain SGD (typical: 1e-8).
    eps: float = Field(1e-8, gt=0, le=1, description="AdamW epsilon.")
    max_gradient_norm: float = Field(0.5, ge=0, le=CLIP_MAX, description="Global gradient-norm clip; 0 disables clipping.")

    num_epochs: int = Field(10, gt=0, le=COUNT_MAX, description="Passes over the training data (max_steps stops earlier).")
    max_steps: int | None = Field(40000, gt=0, le=COUNT_MAX, description="Optimizer steps to run; null runs num_epochs.")
    warmup_steps: int = Field(2000, ge=0, le=COUNT_MAX, description="Steps of LR warmup from 0 to learning_rate.")
    warmup_schedule: Literal["linear", "cosine"] = Field("cosine", description="Shape of the warmup.")
    lr_scheduler_type: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="Decay after warmup, from learning_rate to lr_end.")
    lr_end: float = Field(1e-4, ge=0, le=LR_MAX, description="Learning rate at the end of the decay.")

    # The guide's loss penalties (ava.model.penalties): unlikelihood terms added to the training loss, logged
    # under their own names, never part of lm_loss or evaluation. Off by default: base.yaml sets the guide's values.
    repetition_penalty_weight: float = Field(
        0.0, ge=0, le=COEF_MAX, description="Weight of the repetition unlikelihood loss (Welleck et al., 2019): pushes down "
        "tokens already in the document's last repetition_penalty_window tokens. 0 = off.")
    repetition_penalty_window: int = Field(
        64, ge=1, le=4096, description="How many earlier tokens of the same document the repetition penalty looks at.")
    immediate_repetition_weight: float = Field(
        0.0, ge=0, le=COEF_MAX, description="Weight of the penalty for repeating the previous token. 0 = off.")
    min_sequence_length: int = Field(
        20, ge=0, le=TOKENS_MAX, description="Document (SFT: response) length in tokens below which the end token is penalised.")
    eos_penalty_weight: float = Field(
        0.0, ge=0, le=COEF_MAX, description="Weight of the early-end penalty (needs min_sequence_length > 0). 0 = off.")

    mixed_precision: Precision = Field("fp16", description="Training precision: fp32, fp16, bf16 or fp8.")
    gradient_checkpointing: bool = Field(True, description="Recompute activations in backward to save memory.")
    compile: Literal["auto"] | bool = Field(
        "auto", description="Compile each transformer block with torch.compile (fused norms, RoPE, activations). "
        "auto: on with a CUDA GPU under ZeRO-0/1/2; off on CPU, where the 6-16% faster step does not repay 8-60 s "
        "of compilation in a short run, and under ZeRO-3, whose parameter hooks break the graphs.")
    dataloader_num_workers: int = Field(8, ge=0, le=WORKERS_MAX, description="Same value as data.dataloader_num_workers.")

    eval_strategy: Literal["steps", "epoch", "no"] = Field("steps", description="When to evaluate.")
    eval_steps: int = Field(500, gt=0, le=COUNT_MAX, description="Evaluate every this many steps (eval_strategy: steps).")
    save_strategy: Literal["steps", "epoch", "best", "no"] = Field(
        "steps", description="When to save checkpoints: every save_steps, every epoch, only when the evaluation "
        "loss improves (best: no final checkpoint unless it is the best; the exported model is the best one), "
        "or no (only at the end).")
    save_steps: int = Field(1000, gt=0, le=COUNT_MAX, description="Save every this many steps (save_strategy: steps).")
    logging_steps: int = Field(50, gt=0, le=COUNT_MAX, description="Log metrics every this many steps.")

    early_stopping_patience: int | None = Field(
        3, ge=0, le=COUNT_MAX, description="Evaluations without improvement before stopping; null disables.")
    early_stopping_threshold: float = Field(0.01, ge=0, le=LOSS_MAX, description="Smallest eval-loss decrease that counts.")

    keep_last_checkpoints: int = Field(3, ge=1, le=COUNT_MAX, description="Step checkpoints kept; older ones are deleted.")
    save_best_checkpoint: bool = Field(True, description="Also keep the checkpoint with the lowest eval loss.")
    sample_max_new_tokens: int = Field(
        64, ge=0, le=TOKENS_MAX, description="Tokens generated from a held-out prompt at the end of a run; 0 disables.")

    run_name: str | None = Field(None, description="Run name: default output directory and W&B run name.")
    wandb_log: bool = Field(False, description="Log metrics to Weights & Biases (WANDB_MODE=offline needs no network).")
    wandb_project: str = Field("ava", description="W&B project.")
    wandb_entity: str | None = Field(None, description="W&B entity (team or user); null uses your default.")
    tensorboard_dir: str | None = Field(
        None, min_length=1, description="Write every logged number as a TensorBoard scalar (rank 0) into this "
        "directory: a relative path is under the run's output directory (tensorboard -> <output_dir>/tensorboard), "
        "an absolute one gets a subdirectory per run (<dir>/<output_dir's name>), so runs can share one "
        "`tensorboard --logdir`. Needs the tensorboard package. null: off.")

    init_from: str | None = Field(
        None, description="Start from pretrained weights: an Ava model directory (or a run directory holding "
        "model/) or a local Hugging Face GPT-2/Llama/Mixtral directory (config.json). Its architecture replaces "
        "the model: section's shape keys. null trains from scratch.")
    lora: TrainingLoRAConfig = Field(default_factory=TrainingLoRAConfig)

    gradient_health: GradientHealthConfig = Field(default_factory=GradientHealthConfig)
