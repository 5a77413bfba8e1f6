"""The `rlhf:` section, read from `--rlhf_config` files: which stages run, on what, with which settings.

A pipeline is a list of stages run in order in one output directory; each
policy stage (sft, dpo, ppo, grpo) starts from the policy the previous one
produced unless its `init_from` says otherwise, and the reward stage's model
scores PPO's rollouts when PPO is told to (or asked to choose) a reward model.
Per-stage settings live in the stage's own subsection, so one file can
describe SFT -> reward model -> DPO -> PPO -> GRPO without a key meaning two
things. Learning rates and batch sizes left null fall back to `training:`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ava.config.schema.base import (
    BATCH_MAX,
    COEF_MAX,
    COUNT_MAX,
    ITEMS_MAX,
    LR_MAX,
    SCALE_MAX,
    TOKENS_MAX,
    VOCAB_MAX,
    Section,
)
from ava.config.schema.lora import LoRAConfig

StageName = Literal["sft", "reward", "dpo", "ppo", "grpo"]
TaskName = Literal["digits", "copy", "reverse", "sort", "target_token"]
POLICY_STAGES: tuple[str, ...] = ("sft", "dpo", "ppo", "grpo")

# Logits differ by tens of nats at most: at a temperature of 1,000 sampling is uniform over the vocabulary to within
# a few percent, so a higher one changes nothing (typical: 0.7 to 1).
TEMPERATURE_MAX = 1000.0
# DPO's beta multiplies log-probability ratios inside a sigmoid: at 1,000 a ratio of 0.01 nats already saturates it
# (typical: 0.01 to 0.5).
DPO_BETA_MAX = 1000.0


class TaskSpec(Section):
    """A built-in verifiable task: generated prompts, demonstrations, preference pairs and a reward."""

    name: TaskName = Field("digits", description="Which built-in task generates data and scores responses.")
    length: int = Field(6, ge=1, le=64, description="Characters in each task's answer.")
    demonstration_error_rate: float = Field(
        0.0, ge=0, lt=1, description="Share of generated SFT demonstrations given a corrupted answer: imperfect "
                                     "demonstrations, as human ones are, that RL with the task's reward can fix.")


class GenerationConfig(Section):
    """How rollouts are sampled (PPO, GRPO) and how held-out prompts are answered."""

    max_new_tokens: int = Field(16, gt=0, le=TOKENS_MAX, description="Longest generated response, in tokens (eos included).")
    temperature: float = Field(1.0, gt=0, le=TEMPERATURE_MAX, description="Sampling temperature for rollouts.")
    top_k: int | None = Field(None, gt=0, le=VOCAB_MAX, description="Sample only from the k most likely tokens (null: all).")
    top_p: float | None = Field(None, gt=0, le=1, description="Nucleus sampling mass (null: 1.0).")


class _StageBase(Section):
    steps: int = Field(100, gt=0, le=COUNT_MAX, description="Optimizer steps of this stage (PPO/GRPO: rollout iterations).")
    learning_rate: float | None = Field(
        None, gt=0, le=LR_MAX, description="Peak LR of this stage (null: training.learning_rate).")
    warmup_steps: int = Field(0, ge=0, le=COUNT_MAX, description="Linear LR warmup steps; constant LR afterwards.")
    init_from: str | None = Field(
        None, description="Start from: null = the policy the previous stage produced (or rlhf.policy_path), an "
                          "earlier stage's name (e.g. sft), or an Ava model directory.")
    logging_steps: int = Field(5, gt=0, le=COUNT_MAX, description="Log (and show) a record every this many steps.")
    save_steps: int | None = Field(
        None, gt=0, le=COUNT_MAX, description="Write an in-stage checkpoint every this many steps, from which --resume continues "
                                "inside the stage (null: only when a stop signal arrives, e.g. SLURM's SIGTERM).")


class _SupervisedStage(_StageBase):
    batch_size: int | None = Field(
        None, gt=0, le=BATCH_MAX, description="Sequences (pairs) per rank per step (null: training.batch_size).")
    data_path: str | None = Field(None, description="A jsonl file of examples (null: generated from rlhf.task).")
    num_examples: int = Field(2000, gt=0, le=ITEMS_MAX, description="Examples to generate from the task when data_path is null.")
    eval_examples: int = Field(64, ge=0, le=ITEMS_MAX, description="Held-out examples for evaluation.")


class SFTStage(_SupervisedStage):
    """Supervised fine-tuning on prompt/response pairs; the loss covers response tokens only."""

    steps: int = Field(200, gt=0, le=COUNT_MAX, description="Optimizer steps of SFT.")
    packing: bool = Field(True, description="Pack several examples per row (attention stays inside each).")


class RewardStage(_SupervisedStage):
    """A reward model (the Ava model with a scalar head) trained on chosen/rejected pairs."""

    steps: int = Field(200, gt=0, le=COUNT_MAX, description="Optimizer steps of reward-model training.")
    margin: float = Field(0.0, ge=0, le=SCALE_MAX, description="Required score gap in the Bradley-Terry loss (0: plain BT).")


class DPOStage(_SupervisedStage):
    """Direct preference optimisation against a frozen reference (the stage's starting policy)."""

    beta: float = Field(
        0.1, gt=0, le=DPO_BETA_MAX, description="Inverse temperature: how far the policy may move from the reference.")
    loss_type: Literal["sigmoid", "ipo"] = Field("sigmoid", description="sigmoid = DPO; ipo = IPO (length-averaged).")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="Conservative DPO: assumed label-flip rate.")


class _RLStage(_StageBase):
    prompts_path: str | None = Field(
        None, description="A jsonl file of {\"prompt\", optional \"answer\"} (null: prompts generated from rlhf.task).")
    mini_batch_size: int = Field(8, gt=0, le=BATCH_MAX, description="Sequences per rank per optimizer step.")
    ppo_epochs: int = Field(2, gt=0, le=COUNT_MAX, description="Passes over each rollout batch.")
    clip_range: float = Field(0.2, gt=0, lt=1, description="Policy-ratio clip range.")
    kl_estimator: Literal["k1", "k2", "k3"] = Field("k3", description="Per-token estimator of KL(policy || reference).")
    eval_prompts: int = Field(
        64, ge=0, le=ITEMS_MAX, description="Held-out prompts answered greedily before and after the stage.")


class PPOStage(_RLStage):
    """PPO with a critic, a frozen reference and a reward (function or model)."""

    rollout_batch_size: int = Field(16, gt=0, le=BATCH_MAX, description="Prompts per rank per rollout.")
    critic_learning_rate: float | None = Field(None, gt=0, le=LR_MAX, description="Critic LR (null: the stage's learning_rate).")
    gamma: float = Field(1.0, ge=0, le=1, description="Discount factor for GAE.")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda.")
    value_clip_range: float | None = Field(0.2, gt=0, le=SCALE_MAX, description="Clip of the value update (null: unclipped).")
    kl_coef: float = Field(0.05, ge=0, le=COEF_MAX, description="Initial weight of the per-token KL penalty in the reward.")
    kl_controller: Literal["fixed", "adaptive"] = Field("fixed", description="Keep kl_coef, or adapt it to kl_target.")
    kl_target: float | None = Field(None, gt=0, le=SCALE_MAX, description="Target KL per sequence for the adaptive controller.")
    kl_horizon: int = Field(10000, gt=0, le=COUNT_MAX, description="Adaptive controller horizon, in sequences.")
    whiten_advantages: bool = Field(True, description="Normalise advantages to mean 0, std 1 over the rollout (all ranks).")
    reward_clip: float | None = Field(
        10.0, gt=0, le=SCALE_MAX, description="Clip scores to [-c, c] after normalising (null: no clip).")
    normalize_rewards: bool = Field(False, description="Divide scores by a running std over all ranks and steps.")
    entropy_coef: float = Field(0.0, ge=0, le=COEF_MAX, description="Entropy bonus weight in the policy loss.")
    reward_source: Literal["auto", "task", "function", "model"] = Field(
        "auto", description="Score with: auto (function, else model, else task), the task, rlhf.reward_function, "
                            "or a reward model (rlhf.reward_model_path or this pipeline's reward stage).")


class GRPOStage(_RLStage):
    """GRPO: group-relative advantages over num_generations samples per prompt, no critic."""

    prompts_per_step: int = Field(4, gt=0, le=BATCH_MAX, description="Prompts per rank per rollout.")
    num_generations: int = Field(8, ge=2, le=BATCH_MAX, description="Samples per prompt (the group).")
    kl_coef: float = Field(0.04, ge=0, le=COEF_MAX, description="Weight of the KL term in the loss (beta).")
    scale_rewards: bool = Field(True, description="Divide each group's centred rewards by its std.")
    loss_aggregation: Literal["token_mean", "sequence_mean"] = Field(
        "token_mean", description="Average the loss over tokens (DAPO) or over sequences (original GRPO).")


class EngineStages(Section):
    """ZeRO stage of each model's DeepSpeed engine (null: deepspeed.zero_stage)."""

    actor: int | None = Field(None, ge=0, le=3, description="Policy (SFT, DPO, PPO, GRPO) engine.")
    critic: int | None = Field(None, ge=0, le=3, description="PPO critic and the reward-model stage.")
    reference: int | None = Field(None, ge=0, le=3, description="Frozen reference model (inference only).")
    reward: int | None = Field(None, ge=0, le=3, description="Frozen reward model scoring PPO (inference only).")


class RLHFConfig(Section):
    """Reinforcement learning from human feedback: SFT, reward model, DPO, PPO, GRPO."""

    stages: list[StageName] = Field(default_factory=lambda: list[StageName](["ppo"]), min_length=1,
                                    description="Stages to run, in order, in one output directory.")
    policy_path: str | None = Field(
        None, description="Ava model directory (or training run) to fine-tune; null: a freshly initialised model.")
    reward_model_path: str | None = Field(None, description="A reward model directory written by the reward stage.")
    reward_function: str | None = Field(
        None, pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$",
        description="A Python reward callable as `module:function`, called as fn(prompts, responses, answers=...).")
    task: TaskSpec = Field(default_factory=TaskSpec)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    disable_dropout: bool = Field(True, description="Train without dropout, so rollout and update see one policy.")
    gradient_health: Literal["nonfinite", "full", "off"] = Field(
        "nonfinite", description="What training.gradient_health does in RLHF stages: nonfinite = skip NaN/Inf updates "
                                 "and anneal the clip, but no explosion detection (policy-gradient norms swing with the "
                                 "advantages by design); full = as in pre-training; off = plain DeepSpeed steps.")
    sft: SFTStage = Field(default_factory=SFTStage)
    reward: RewardStage = Field(default_factory=RewardStage)
    dpo: DPOStage = Field(default_factory=DPOStage)
    ppo: PPOStage = Field(default_factory=PPOStage)
    grpo: GRPOStage = Field(default_factory=GRPOStage)
    zero_stage: EngineStages = Field(default_factory=EngineStages)
    lora: LoRAConfig = Field(default_factory=LoRAConfig)
