"""GRPO: group-relative advantages over several samples per prompt, no critic (Shao et al. 2024).

Each prompt is answered `num_generations` times; a response's advantage is
its reward relative to its group's (centred, and divided by the group's std
when `scale_rewards`), the same for all its tokens. The loss is PPO's clipped
surrogate plus `kl_coef` times a per-token KL to the frozen reference (k3 by
default, as in the paper), aggregated over tokens or over sequences.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from ava.model import AvaForCausalLM
from ava.rlhf.data import Prompt, PromptSource, prompt_data
from ava.rlhf.engines import RoleEngine, build_engine
from ava.rlhf.evaluation import evaluate_prompts
from ava.rlhf.losses import aggregate_tokens, group_advantages, kl_penalty, masked_mean, ppo_policy_loss
from ava.rlhf.rewards import Scorer
from ava.rlhf.rollout import policy_logprobs, rollout_stats, sample_rollout, scored
from ava.rlhf.stage import (
    RolloutRandomness,
    StageEnv,
    StageFailed,
    StageResult,
    StageSteps,
    Timer,
    Updater,
    fit_stage,
    reward_curve_summary,
    stage_lr,
)


def run_grpo(env: StageEnv, policy: AvaForCausalLM, reference: AvaForCausalLM | None,
             scorer: Scorer | None) -> tuple[StageResult, RoleEngine]:
    g, cfg, tok = env.rlhf.grpo, env.config, env.tokenizer
    assert reference is not None
    if scorer is None:
        raise StageFailed("grpo needs a programmatic reward: set rlhf.reward_function or rlhf.task")
    started = time.perf_counter()
    source, held = prompt_data(g.prompts_path, env.task, g.eval_prompts, env.seed, "rlhf.grpo.prompts_path",
                               env.process.rank, env.process.world_size)
    world, mini, group = env.process.world_size, g.mini_batch_size, g.num_generations
    completions = g.prompts_per_step * group
    lr = stage_lr(env, g)
    actor = build_engine(policy, cfg, "actor", env.zero_stage("actor"), micro_batch=mini, world_size=world,
                         learning_rate=lr)
    ref = build_engine(reference, cfg, "reference", env.zero_stage("reference"), micro_batch=mini, world_size=world,
                       trainable=False)
    updater = Updater(actor, env, lr, g.warmup_steps, g.steps * g.ppo_epochs * (completions // mini), "grpo")
    env.note(f"grpo: {g.prompts_per_step} prompts x {group} samples x {world} rank(s) per step, {g.ppo_epochs} "
             f"epoch(s) of {completions // mini} mini batch(es); reward: {scorer.name}; KL {g.kl_estimator} x "
             f"{g.kl_coef:g} in the loss ({g.loss_aggregation}); ZeRO stages actor {actor.zero_stage} / "
             f"reference {ref.zero_stage}")
    steps = GRPOSteps(env, updater, ref, scorer, source)
    result, evaluation = fit_stage(env, steps, g.steps, g.logging_steps,
                                   lambda: evaluate_prompts(actor, held, tok, env.rlhf.generation, scorer))
    summary = reward_curve_summary(steps.rewards_per_step, steps.timer, evaluation.before, evaluation.after)
    return StageResult("grpo", status=result.status, steps=result.steps, seconds=time.perf_counter() - started,
                       summary=summary, health=steps.health()), actor


class GRPOSteps(StageSteps):
    """One GRPO step: a group of samples per prompt, scored, then `ppo_epochs` passes of clipped updates."""

    stage = "grpo"

    def __init__(self, env: StageEnv, updater: Updater, reference: RoleEngine, scorer: Scorer,
                 source: PromptSource) -> None:
        super().__init__(env, [updater])
        self.updater, self.reference, self.scorer, self.source = updater, reference, scorer, source
        self.randomness = RolloutRandomness.for_rank(env.seed, env.process.rank, updater.role.device, "grpo")
        self.timer = Timer()
        self.rewards_per_step: list[float] = []
        self.window: list[dict[str, float]] = []
        self.flat_groups: list[float] = []

    def step(self, step: int, logs: bool) -> dict[str, Any] | None:
        g, env, actor = self.env.rlhf.grpo, self.env, self.updater.role
        group, mini, timer, randomness = g.num_generations, g.mini_batch_size, self.timer, self.randomness
        completions = g.prompts_per_step * group
        temperature = env.rlhf.generation.temperature
        prompts: list[Prompt] = [p for p in self.source.batch(g.prompts_per_step, randomness.prompts)
                                 for _ in range(group)]
        with timer.phase("generation"):
            rollout = sample_rollout(actor, prompts, env.tokenizer, env.rlhf.generation, randomness.sampling)
        with timer.phase("scoring"), torch.no_grad():
            ids, mask = rollout.batch.input_ids, rollout.batch.response_mask
            scores = scored(self.scorer, rollout)
            advantages = group_advantages(scores, group, g.scale_rewards)[:, None].expand_as(mask)
            old_logp, _, _ = policy_logprobs(actor, ids, temperature=temperature)
            ref_logp, _, _ = policy_logprobs(self.reference, ids, temperature=temperature)
            self.flat_groups.append(float((scores.reshape(-1, group).std(dim=1) == 0).float().mean()))
        with timer.phase("training"):
            actor.engine.train()
            for _ in range(g.ppo_epochs):
                order = torch.randperm(completions, generator=randomness.shuffle).to(ids.device)
                for chunk in order.split(mini):
                    m = mask[chunk]
                    logp, entropy, router = policy_logprobs(actor, ids[chunk], entropy=True, temperature=temperature)
                    assert entropy is not None
                    pg, clip_frac, approx_kl = ppo_policy_loss(logp, old_logp[chunk], advantages[chunk], m,
                                                               g.clip_range, g.loss_aggregation)
                    kl = kl_penalty(logp, ref_logp[chunk], g.kl_estimator)
                    loss = pg + g.kl_coef * aggregate_tokens(kl, m, g.loss_aggregation)
                    self.updater.step(loss + router if router is not None else loss)
                    self.window.append({"policy_loss": float(pg.detach()), "clip_fraction": float(clip_frac),
                                        "approx_kl": float(approx_kl), "entropy": float(masked_mean(entropy, m)),
                                        "kl_per_token": float(masked_mean(kl.detach(), m))})
        with torch.no_grad():
            kl_seq = torch.where(mask, kl_penalty(old_logp, ref_logp, g.kl_estimator), 0.0).sum(dim=1)
        stats = rollout_stats(rollout, scores, kl_seq, env.sum_over_ranks)
        self.rewards_per_step.append(stats["reward"])
        if not logs:
            return None
        window = self.window
        means = {k: sum(w[k] for w in window) / len(window) for k in window[0]}
        means["flat_groups"] = sum(self.flat_groups) / len(self.flat_groups)  # groups whose rewards were all equal
        self.flat_groups, self.window = [], []
        spent = sum(timer.totals.values())
        return {**stats, **env.mean_over_ranks(means, actor.device), "lr": self.updater.last_lr,
                "grad_norm": self.updater.last_grad_norm,
                "generation_share": timer.totals.get("generation", 0.0) / spent if spent else None}

    def extra_state(self) -> dict[str, Any]:
        return {"randomness": self.randomness.state_dict(), "source": self.source.state_dict(),
                "timer": self.timer.state_dict(), "rewards_per_step": list(self.rewards_per_step),
                "window": list(self.window), "flat_groups": list(self.flat_groups)}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.randomness.load_state_dict(state["randomness"])
        self.source.load_state_dict(state["source"])
        self.timer.load_state_dict(state["timer"])
        self.rewards_per_step = [float(v) for v in state["rewards_per_step"]]
        self.window = [dict(w) for w in state["window"]]
        self.flat_groups = [float(v) for v in state["flat_groups"]]
