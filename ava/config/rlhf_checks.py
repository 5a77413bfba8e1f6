"""Cross-key rules of the `rlhf:` section: stage order, batch divisibility, reward and KL choices.

Run by `ava.config.checks` when an RLHF config is part of the stack, so a
pipeline that cannot run fails at load time, with every problem at once,
instead of after the first stage has trained for an hour.
"""

from __future__ import annotations

from ava.config.check_context import CheckContext
from ava.config.errors import Notice
from ava.config.lora_checks import check_lora_targets
from ava.config.schema import DeepSpeedSection, ModelConfig, RLHFConfig, TrainingConfig
from ava.config.schema.rlhf import POLICY_STAGES


def check_rlhf(ctx: CheckContext) -> None:
    r, ds, m = ctx.sections["rlhf"], ctx.sections["deepspeed"], ctx.sections["model"]
    assert isinstance(r, RLHFConfig) and isinstance(ds, DeepSpeedSection) and isinstance(m, ModelConfig)
    _stages(ctx, r)
    _batches(ctx, r)
    _rewards(ctx, r)
    _kl(ctx, r)
    if r.dpo.loss_type == "ipo" and r.dpo.label_smoothing:
        ctx.problem("rlhf.dpo.label_smoothing", "applies to the sigmoid (DPO) loss only; IPO regresses the margin "
                    "to a target and has no labels to smooth", "set label_smoothing: 0, or loss_type: sigmoid",
                    r.dpo.label_smoothing)
    if ds.ep_size > 1:
        ctx.problem("deepspeed.ep_size", f"is {ds.ep_size}, but RLHF engines do not support expert parallelism",
                    "set deepspeed.ep_size: 1 for RLHF (experts are then replicated or ZeRO-partitioned)", ds.ep_size)
    _lora(ctx, r, m)
    _train_py_only(ctx)
    if m.use_rag or m.use_cross_attention:
        key = "model.use_rag" if m.use_rag else "model.use_cross_attention"
        ctx.problem(key, "RLHF stages do not retrieve neighbours or carry a context, so the cross-attention blocks "
                    "would read nothing and their weights would get no gradient",
                    "set model.use_rag and model.use_cross_attention to false for RLHF (MoH, MoA and the episodic "
                    "memory do work there)", True)


def _train_py_only(ctx: CheckContext) -> None:
    """training.lora and training.init_from belong to train.py; an RLHF pipeline has its own keys for both."""
    t = ctx.sections.get("training")
    if not isinstance(t, TrainingConfig):
        return
    if t.lora.enabled:
        ctx.problem("training.lora.enabled", "applies to train.py only; RLHF stages take their adapters from "
                    "rlhf.lora", "move the LoRA settings to rlhf.lora (rank, alpha, dropout, target_modules)",
                    t.lora.enabled)
    if t.init_from:
        ctx.problem("training.init_from", "applies to train.py only; RLHF stages start from rlhf.policy_path or "
                    "their own init_from", "set rlhf.policy_path (or rlhf.<stage>.init_from) to the model "
                    "directory instead", t.init_from)


def _kl(ctx: CheckContext, r: RLHFConfig) -> None:
    p = r.ppo
    if p.kl_controller == "adaptive" and p.kl_target is None:
        ctx.problem("rlhf.ppo.kl_controller", "the adaptive KL controller steers the KL towards rlhf.ppo.kl_target, "
                    "which is not set", "set rlhf.ppo.kl_target (e.g. 6.0, nats per sequence) or use "
                    "kl_controller: fixed", p.kl_controller)
    if p.kl_controller == "adaptive" and p.kl_coef == 0:
        ctx.problem("rlhf.ppo.kl_coef", "is 0, and the adaptive controller only ever multiplies it: it would stay 0",
                    "start from a positive kl_coef (e.g. 0.05), or use kl_controller: fixed", p.kl_coef)
    if p.kl_controller == "fixed" and p.kl_target is not None:
        ctx.notices.append(Notice("warning", ctx.where("rlhf.ppo.kl_target"), "rlhf.ppo.kl_target",
                                  "is only used by kl_controller: adaptive; with fixed it has no effect"))


def _lora(ctx: CheckContext, r: RLHFConfig, m: ModelConfig) -> None:
    if not r.lora.enabled:
        return
    if r.lora.dropout and r.disable_dropout:
        ctx.problem("rlhf.lora.dropout", "rlhf.disable_dropout (on by default) turns every dropout off, this one too, "
                    "so that rollouts and updates see the same policy", "set rlhf.lora.dropout: 0, or "
                    "rlhf.disable_dropout: false (then PPO/GRPO ratios start away from 1)", r.lora.dropout)
    check_lora_targets(ctx, "rlhf.lora", r.lora, m)


def _stages(ctx: CheckContext, r: RLHFConfig) -> None:
    seen: set[str] = set()
    for stage in r.stages:
        if stage in seen:
            ctx.problem("rlhf.stages", f"stage '{stage}' is listed twice; each stage writes its own "
                        "output directory", "list each stage once", r.stages)
        seen.add(stage)
    for i, stage in enumerate(r.stages):
        origin = getattr(r, stage).init_from
        if origin is None or origin not in ("sft", "reward", "dpo", "ppo", "grpo"):
            continue  # null, or a model directory (checked when the stage starts)
        key = f"rlhf.{stage}.init_from"
        if origin not in POLICY_STAGES:
            ctx.problem(key, f"'{origin}' trains a reward model, not a policy", "start from a policy stage "
                        f"({', '.join(s for s in r.stages[:i] if s in POLICY_STAGES) or 'none listed earlier'}) "
                        "or an Ava model directory", origin)
        elif origin not in r.stages[:i]:
            ctx.problem(key, f"stage '{origin}' does not run before '{stage}' (rlhf.stages = {r.stages})",
                        f"list '{origin}' before '{stage}' in rlhf.stages, or set init_from to a model directory",
                        origin)


def _batches(ctx: CheckContext, r: RLHFConfig) -> None:
    if "ppo" in r.stages and r.ppo.rollout_batch_size % r.ppo.mini_batch_size:
        ctx.problem("rlhf.ppo.mini_batch_size", f"must divide rlhf.ppo.rollout_batch_size = "
                    f"{r.ppo.rollout_batch_size}: each PPO epoch splits the rollout into equal optimizer steps",
                    f"use a mini_batch_size dividing {r.ppo.rollout_batch_size}", r.ppo.mini_batch_size)
    g = r.grpo
    if "grpo" in r.stages and (g.prompts_per_step * g.num_generations) % g.mini_batch_size:
        total = g.prompts_per_step * g.num_generations
        ctx.problem("rlhf.grpo.mini_batch_size", f"must divide prompts_per_step x num_generations = {total} "
                    "completions per rollout", f"use a mini_batch_size dividing {total}", g.mini_batch_size)


def _rewards(ctx: CheckContext, r: RLHFConfig) -> None:
    if "ppo" not in r.stages:
        return
    source = r.ppo.reward_source
    if source == "function" and r.reward_function is None:
        ctx.problem("rlhf.ppo.reward_source", "is 'function' but rlhf.reward_function is not set",
                    "set rlhf.reward_function: module:function, or reward_source: task", source)
    has_model = r.reward_model_path is not None or (
        "reward" in r.stages and r.stages.index("reward") < r.stages.index("ppo"))
    if source == "model" and not has_model:
        ctx.problem("rlhf.ppo.reward_source", "is 'model' but there is no reward model: rlhf.reward_model_path is "
                    "not set and no reward stage runs before ppo",
                    "set rlhf.reward_model_path, or list 'reward' before 'ppo' in rlhf.stages", source)
