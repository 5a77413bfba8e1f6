"""PPO: actor, critic, frozen reference and a reward (function or model), as in Ouyang et al. 2022.

One step: sample a response per prompt (weights gathered once under ZeRO-3),
score it, compute the old policy's, the reference's and the critic's view of
every response token, turn the score and a per-token KL penalty into
token rewards, estimate advantages with GAE, then take `ppo_epochs` passes of
clipped policy and value updates over mini batches. The KL coefficient is
fixed or adapted towards a target (Ziegler et al. 2019).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from ava.model import AvaForCausalLM
from ava.rlhf.data import PromptSource, prompt_data
from ava.rlhf.engines import RoleEngine, build_engine
from ava.rlhf.evaluation import evaluate_prompts
from ava.rlhf.kl_control import make_kl_controller
from ava.rlhf.losses import gae, kl_penalty, masked_mean, masked_sum, masked_whiten, ppo_policy_loss, value_loss
from ava.rlhf.models import disable_dropout, load_value_model, value_model_from_policy
from ava.rlhf.rewards import Scorer
from ava.rlhf.rollout import (
    Rollout,
    policy_logprobs,
    rollout_stats,
    sample_rollout,
    scored,
    sequence_scores,
    token_values,
)
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


class RunningMoments:
    """Mean and variance of every score seen so far, on all ranks (Chan et al.'s parallel update)."""

    def __init__(self) -> None:
        self.count, self.mean, self.var = 0.0, 0.0, 1.0

    def update(self, total: float, total_sq: float, n: float) -> None:
        if n <= 0:
            return
        batch_mean = total / n
        batch_var = max(total_sq / n - batch_mean * batch_mean, 0.0)
        delta, new_count = batch_mean - self.mean, self.count + n
        m2 = self.var * self.count + batch_var * n + delta * delta * self.count * n / new_count
        self.mean += delta * n / new_count
        self.count, self.var = new_count, m2 / new_count

    @property
    def std(self) -> float:
        return max(self.var, 1e-8) ** 0.5


def run_ppo(env: StageEnv, policy: AvaForCausalLM, reference: AvaForCausalLM | None, eval_scorer: Scorer | None,
            scorer: Scorer | None, reward_model: Path | None) -> tuple[StageResult, RoleEngine]:
    """PPO from `policy`; rollouts are scored by `reward_model` when given, else by `scorer`.

    Held-out prompts are always judged by `eval_scorer` (the reward function or
    the task's scorer), so a reward model's progress is measured against the
    thing it stands in for.
    """
    s, cfg, tok = env.rlhf.ppo, env.config, env.tokenizer
    assert reference is not None
    started = time.perf_counter()
    if reward_model is None and scorer is None:
        raise StageFailed("ppo has no reward: set rlhf.reward_function, rlhf.reward_model_path or rlhf.task")
    source, held = prompt_data(s.prompts_path, env.task, s.eval_prompts, env.seed, "rlhf.ppo.prompts_path",
                               env.process.rank, env.process.world_size)
    world, mini = env.process.world_size, s.mini_batch_size
    lr = stage_lr(env, s)
    critic_lr = s.critic_learning_rate or lr
    # The critic starts as the reward model when there is one (it already reads responses), else as the policy.
    critic_model = (load_value_model(reward_model, "reward model") if reward_model is not None
                    else value_model_from_policy(reference))
    if env.rlhf.disable_dropout:  # the critic's rollout values and its updates must see one function too
        disable_dropout(critic_model)
    actor = build_engine(policy, cfg, "actor", env.zero_stage("actor"), micro_batch=mini, world_size=world,
                         learning_rate=lr)
    critic = build_engine(critic_model, cfg, "critic", env.zero_stage("critic"), micro_batch=mini, world_size=world,
                          learning_rate=critic_lr)
    ref = build_engine(reference, cfg, "reference", env.zero_stage("reference"), micro_batch=mini, world_size=world,
                       trainable=False)
    rm = (build_engine(load_value_model(reward_model, "reward model"), cfg, "reward", env.zero_stage("reward"),
                       micro_batch=mini, world_size=world, trainable=False) if reward_model is not None else None)
    updates = s.steps * s.ppo_epochs * (s.rollout_batch_size // mini)
    actor_up = Updater(actor, env, lr, s.warmup_steps, updates, "ppo")
    critic_up = Updater(critic, env, critic_lr, s.warmup_steps, updates, "ppo")
    reward_name = f"reward model {reward_model}" if rm is not None else scorer.name  # type: ignore[union-attr]
    env.note(f"ppo: {s.rollout_batch_size} prompts x {world} rank(s) per step, {s.ppo_epochs} epoch(s) of "
             f"{s.rollout_batch_size // mini} mini batch(es); reward: {reward_name}; KL {s.kl_estimator} x "
             f"{s.kl_coef:g} ({s.kl_controller}); ZeRO stages actor {actor.zero_stage} / critic {critic.zero_stage} / "
             f"reference {ref.zero_stage}" + (f" / reward {rm.zero_stage}" if rm else ""))
    steps = PPOSteps(env, actor_up, critic_up, ref, rm, scorer, source)
    result, evaluation = fit_stage(env, steps, s.steps, s.logging_steps,
                                   lambda: evaluate_prompts(actor, held, tok, env.rlhf.generation, eval_scorer))
    summary = reward_curve_summary(steps.rewards_per_step, steps.timer, evaluation.before, evaluation.after)
    return StageResult("ppo", status=result.status, steps=result.steps, seconds=time.perf_counter() - started,
                       summary=summary, health=steps.health()), actor


class PPOSteps(StageSteps):
    """One PPO step: a rollout, its rewards and advantages, then `ppo_epochs` of actor and critic updates."""

    stage = "ppo"

    def __init__(self, env: StageEnv, actor: Updater, critic: Updater, reference: RoleEngine,
                 reward_model: RoleEngine | None, scorer: Scorer | None, source: PromptSource) -> None:
        super().__init__(env, [actor, critic])
        s = env.rlhf.ppo
        self.actor, self.critic, self.reference, self.reward_model = actor, critic, reference, reward_model
        self.scorer, self.source = scorer, source
        self.kl_ctl = make_kl_controller(s.kl_controller, s.kl_coef, s.kl_target, s.kl_horizon)
        self.moments = RunningMoments()
        self.randomness = RolloutRandomness.for_rank(env.seed, env.process.rank, actor.role.device, "ppo")
        self.timer = Timer()
        self.rewards_per_step: list[float] = []
        self.window: list[dict[str, float]] = []

    def step(self, step: int, logs: bool) -> dict[str, Any] | None:
        s, env, timer, randomness = self.env.rlhf.ppo, self.env, self.timer, self.randomness
        actor, critic, mini = self.actor.role, self.critic.role, s.mini_batch_size
        temperature = env.rlhf.generation.temperature
        prompts = self.source.batch(s.rollout_batch_size, randomness.prompts)
        with timer.phase("generation"):
            rollout = sample_rollout(actor, prompts, env.tokenizer, env.rlhf.generation, randomness.sampling)
        with timer.phase("scoring"), torch.no_grad():
            critic.engine.eval()
            ids, mask = rollout.batch.input_ids, rollout.batch.response_mask
            old_logp, _, _ = policy_logprobs(actor, ids, temperature=temperature)
            ref_logp, _, _ = policy_logprobs(self.reference, ids, temperature=temperature)
            old_values, _ = token_values(critic, ids)
            scores = _scores(rollout, self.reward_model, self.scorer)
            shaped = _shape_scores(env, scores, self.moments, s.normalize_rewards, s.reward_clip)
            kl = torch.where(mask, kl_penalty(old_logp, ref_logp, s.kl_estimator), torch.zeros_like(old_logp))
            token_rewards = -self.kl_ctl.value * kl
            last = rollout.batch.last_index - 1  # the position that predicts each response's last token
            token_rewards[torch.arange(len(scores), device=ids.device), last] += shaped
            advantages, returns = gae(token_rewards, old_values, mask, s.gamma, s.lam)
            if s.whiten_advantages:
                advantages = masked_whiten(advantages, mask, all_reduce=env.sum_over_ranks)
        with timer.phase("training"):
            actor.engine.train()
            critic.engine.train()
            for _ in range(s.ppo_epochs):
                order = torch.randperm(len(scores), generator=randomness.shuffle).to(ids.device)
                for chunk in order.split(mini):
                    m = mask[chunk]
                    logp, entropy, router = policy_logprobs(actor, ids[chunk], entropy=True,
                                                            entropy_grad=s.entropy_coef > 0,
                                                            temperature=temperature)
                    assert entropy is not None
                    pg, clip_frac, approx_kl = ppo_policy_loss(logp, old_logp[chunk], advantages[chunk], m,
                                                               s.clip_range)
                    loss = pg - s.entropy_coef * masked_mean(entropy, m)
                    self.actor.step(loss + router if router is not None else loss)
                    values, v_router = token_values(critic, ids[chunk])
                    v_loss, v_clip = value_loss(values, old_values[chunk], returns[chunk], m, s.value_clip_range)
                    self.critic.step(v_loss + v_router if v_router is not None else v_loss)
                    self.window.append({"policy_loss": float(pg.detach()), "value_loss": float(v_loss.detach()),
                                        "clip_fraction": float(clip_frac), "approx_kl": float(approx_kl),
                                        "value_clip_fraction": float(v_clip),
                                        "entropy": float(masked_mean(entropy.detach(), m))})
        stats = rollout_stats(rollout, scores, masked_sum(kl, mask, dim=1), env.sum_over_ranks)
        self.rewards_per_step.append(stats["reward"])
        self.kl_ctl.update(stats["kl"], s.rollout_batch_size * env.process.world_size)
        if not logs:
            return None
        window = self.window
        updates_mean = env.mean_over_ranks({k: sum(w[k] for w in window) / len(window) for k in window[0]},
                                           actor.device)
        self.window = []
        spent = sum(timer.totals.values())
        return {**stats, **updates_mean, "kl_coef": self.kl_ctl.value, "lr": self.actor.last_lr,
                "grad_norm": self.actor.last_grad_norm, "critic_grad_norm": self.critic.last_grad_norm,
                "generation_share": timer.totals.get("generation", 0.0) / spent if spent else None}

    def extra_state(self) -> dict[str, Any]:
        m = self.moments
        return {"randomness": self.randomness.state_dict(), "source": self.source.state_dict(),
                "kl": self.kl_ctl.state_dict(), "moments": {"count": m.count, "mean": m.mean, "var": m.var},
                "timer": self.timer.state_dict(), "rewards_per_step": list(self.rewards_per_step),
                "window": list(self.window)}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.randomness.load_state_dict(state["randomness"])
        self.source.load_state_dict(state["source"])
        self.kl_ctl.load_state_dict(state["kl"])
        moments = state["moments"]
        self.moments.count, self.moments.mean, self.moments.var = (float(moments["count"]), float(moments["mean"]),
                                                                   float(moments["var"]))
        self.timer.load_state_dict(state["timer"])
        self.rewards_per_step = [float(v) for v in state["rewards_per_step"]]
        self.window = [dict(w) for w in state["window"]]

    def health(self) -> dict[str, Any] | None:
        return {"actor": self.actor.health.summary() if self.actor.health else None,
                "critic": self.critic.health.summary() if self.critic.health else None}


def _scores(rollout: Rollout, rm: RoleEngine | None, scorer: Scorer | None) -> torch.Tensor:
    """Each response's score: the reward model's, or the reward function's."""
    if rm is not None:
        return sequence_scores(rm, rollout.batch)[0].float()
    assert scorer is not None
    return scored(scorer, rollout)


def _shape_scores(env: StageEnv, scores: torch.Tensor, moments: RunningMoments, normalize: bool,
                  clip: float | None) -> torch.Tensor:
    """Scores as PPO's terminal rewards: divided by the running std (all ranks) if asked, then clipped."""
    if normalize:
        total = env.sum_over_ranks(torch.stack([scores.sum(), scores.square().sum(),
                                                torch.tensor(float(len(scores)), device=scores.device)]).double())
        moments.update(*total.tolist())
        scores = scores / moments.std
    return scores.clamp(-clip, clip) if clip is not None else scores
