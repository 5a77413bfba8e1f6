"""GRPO: group-relative advantages over several samples per prompt, no critic (Shao et al. 2024).

Each prompt is answered `num_generations` times; a response's advantage is
its reward relative to its group's (centred, and divided by the group's std
when `scale_rewards`), the same for all its tokens. The loss is PPO's clipped
surrogate plus `kl_coef` times a per-token KL to the frozen reference (k3 by
default, as in the paper), aggregated over tokens or over sequences.
"""

from __future__ import annotations

import time

import torch

from ava.model import AvaForCausalLM
from ava.rlhf.data import Prompt, prompt_data
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
    Timer,
    Updater,
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
    before = evaluate_prompts(actor, held, tok, env.rlhf.generation, scorer)
    env.log({"stage": "grpo", "step": 0, **before})
    randomness = RolloutRandomness.for_rank(env.seed, env.process.rank, actor.device, "grpo")
    timer = Timer()
    temperature = env.rlhf.generation.temperature
    rewards_per_step: list[float] = []
    window: list[dict[str, float]] = []
    flat_groups: list[float] = []
    for step in range(1, g.steps + 1):
        prompts: list[Prompt] = [p for p in source.batch(g.prompts_per_step, randomness.prompts) for _ in range(group)]
        with timer.phase("generation"):
            rollout = sample_rollout(actor, prompts, tok, env.rlhf.generation, randomness.sampling)
        with timer.phase("scoring"), torch.no_grad():
            ids, mask = rollout.batch.input_ids, rollout.batch.response_mask
            scores = scored(scorer, rollout)
            advantages = group_advantages(scores, group, g.scale_rewards)[:, None].expand_as(mask)
            old_logp, _, _ = policy_logprobs(actor, ids, temperature=temperature)
            ref_logp, _, _ = policy_logprobs(ref, ids, temperature=temperature)
            flat_groups.append(float((scores.reshape(-1, group).std(dim=1) == 0).float().mean()))
        with timer.phase("training"):
            actor.engine.train()
            for _ in range(g.ppo_epochs):
                order = torch.randperm(completions, generator=randomness.shuffle).to(ids.device)
                for chunk in order.split(mini):
                    m = mask[chunk]
                    logp, entropy, router = policy_logprobs(actor, ids[chunk], entropy=True,
                                                            temperature=temperature)
                    assert entropy is not None
                    pg, clip_frac, approx_kl = ppo_policy_loss(logp, old_logp[chunk], advantages[chunk], m,
                                                               g.clip_range, g.loss_aggregation)
                    kl = kl_penalty(logp, ref_logp[chunk], g.kl_estimator)
                    loss = pg + g.kl_coef * aggregate_tokens(kl, m, g.loss_aggregation)
                    updater.step(loss + router if router is not None else loss)
                    window.append({"policy_loss": float(pg.detach()), "clip_fraction": float(clip_frac),
                                   "approx_kl": float(approx_kl), "entropy": float(masked_mean(entropy, m)),
                                   "kl_per_token": float(masked_mean(kl.detach(), m))})
        with torch.no_grad():
            kl_seq = torch.where(mask, kl_penalty(old_logp, ref_logp, g.kl_estimator), 0.0).sum(dim=1)
        stats = rollout_stats(rollout, scores, kl_seq, env.sum_over_ranks)
        rewards_per_step.append(stats["reward"])
        if step % g.logging_steps == 0 or step == g.steps:
            means = {k: sum(w[k] for w in window) / len(window) for k in window[0]}
            means["flat_groups"] = sum(flat_groups) / len(flat_groups)  # groups whose rewards were all equal
            flat_groups = []
            spent = sum(timer.totals.values())
            env.log({"stage": "grpo", "step": step, **stats, **env.mean_over_ranks(means, actor.device),
                     "lr": updater.last_lr, "grad_norm": updater.last_grad_norm,
                     "generation_share": timer.totals.get("generation", 0.0) / spent if spent else None})
            window = []
    after = evaluate_prompts(actor, held, tok, env.rlhf.generation, scorer)
    env.log({"stage": "grpo", "step": g.steps, **after})
    summary = reward_curve_summary(rewards_per_step, timer, before, after)
    return StageResult("grpo", steps=g.steps, seconds=time.perf_counter() - started, summary=summary,
                       health=updater.health.summary() if updater.health else None), actor
