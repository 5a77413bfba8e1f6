"""The `rlhf:` section, read from `--rlhf_config` files.

A minimal schema: the stage to run and the PPO/GRPO/DPO hyperparameters the
guide's test_cpu.yaml names.  The RLHF trainer extends it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ava.config.schema.base import Section


class RLHFConfig(Section):
    """Reinforcement learning from human feedback."""

    stage: Literal["sft", "reward", "dpo", "ppo", "grpo"] = Field("ppo", description="Which RLHF stage to run.")
    policy_path: str | None = Field(None, description="Checkpoint of the model to fine-tune.")
    reward_model_path: str | None = Field(None, description="Checkpoint of a trained reward model.")
    reward_function: str | None = Field(
        None, pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$",
        description="A Python reward callable as `module:function`.")
    kl_coef: float = Field(0.1, ge=0, description="Weight of the KL penalty against the reference model.")
    gamma: float = Field(1.0, ge=0, le=1, description="Discount factor for GAE.")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda.")
    clip_range: float = Field(0.2, gt=0, description="PPO policy-ratio clip range.")
    ppo_epochs: int = Field(4, gt=0, description="Optimisation epochs per rollout batch.")
    num_generations: int = Field(4, gt=0, description="Samples per prompt (GRPO group size).")
    max_new_tokens: int = Field(32, gt=0, description="Longest generated response.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature for rollouts.")
    dpo_beta: float = Field(0.1, gt=0, description="DPO inverse temperature.")
