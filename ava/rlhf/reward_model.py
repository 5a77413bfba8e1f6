"""Reward-model training: the Ava model with a scalar head, fitted to chosen/rejected pairs.

The score of a sequence is the head's value at its last token: the eos after
the response, or, for a pair cut to data.max_length (data.truncation), the last
token kept, as for a rollout cut at max_new_tokens. The Bradley-Terry loss, -log sigmoid(r_chosen - r_rejected -
margin), makes the chosen response score higher; accuracy is the share of
pairs ordered correctly.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from ava.model import AvaForCausalLM
from ava.rlhf.data import encoded_preferences, rank_batches, sequence_batch
from ava.rlhf.engines import RoleEngine, build_engine
from ava.rlhf.losses import pairwise_reward_loss
from ava.rlhf.models import head_std_for, value_model_from_policy
from ava.rlhf.rollout import sequence_scores
from ava.rlhf.stage import StageEnv, StageResult, StageSteps, Updater, fit_stage, stage_lr

EVAL_CHUNK = 32


def run_reward(env: StageEnv, init: AvaForCausalLM) -> tuple[StageResult, RoleEngine]:
    """Train a reward model whose trunk starts as `init`; returns the result and its engine."""
    s, cfg, tok = env.rlhf.reward, env.config, env.tokenizer
    started = time.perf_counter()
    data = encoded_preferences(tok, s, env.task, env.seed, "rlhf.reward.data_path", cfg.data.max_length,
                               cfg.data.truncation)
    encoded, held_encoded = data.train, data.held
    for note in data.notes("reward", cfg.data.max_length):
        env.note(note)
    batch = s.batch_size or cfg.training.batch_size
    lr = stage_lr(env, s)
    # The head's random start comes from the run's seed, not from whatever the stages before this one left in
    # the global RNG: otherwise the same SFT model and seed gave another reward model when SFT had run in this
    # process than when it had not (a resumed pipeline), or when any earlier code drew one number more.
    with torch.random.fork_rng(devices=[]):  # the CPU generator, where the model is built; restored after
        torch.random.default_generator.manual_seed(env.seed)
        model = value_model_from_policy(init, head_std=head_std_for(cfg.model.hidden_size))
    critic = build_engine(model, cfg, "reward model", env.zero_stage("critic"), micro_batch=2 * batch,
                          world_size=env.process.world_size, learning_rate=lr)
    env.note(f"reward: {len(encoded)} pairs, {batch} pairs x {env.process.world_size} rank(s) per step, lr {lr:g}, "
             f"margin {s.margin:g}, ZeRO stage {critic.zero_stage}")
    steps = RewardSteps(env, Updater(critic, env, lr, s.warmup_steps, s.steps, "reward"), encoded, batch)
    result, evaluation = fit_stage(env, steps, s.steps, s.logging_steps,
                                   lambda: _evaluate(critic, held_encoded, tok.eos_id))
    summary = {"first_loss": steps.first_loss, "final_loss": steps.final_loss,
               **{f"before/{k}": v for k, v in evaluation.before.items()},
               **{f"after/{k}": v for k, v in evaluation.after.items()}}
    return StageResult("reward", status=result.status, steps=result.steps, seconds=time.perf_counter() - started,
                       summary=summary, health=steps.health()), critic


class RewardSteps(StageSteps):
    """One reward-model step: a batch of chosen/rejected pairs, the Bradley-Terry loss on their scores."""

    stage = "reward"

    def __init__(self, env: StageEnv, updater: Updater, encoded: list, batch: int) -> None:
        super().__init__(env, [updater])
        self.updater, self.encoded, self.batch = updater, encoded, batch
        self.batches = rank_batches(len(encoded), batch, env.process.rank, env.process.world_size, env.seed)
        self.window: list[tuple[float, float, float]] = []
        self.first_loss: float | None = None
        self.final_loss: float | None = None

    def step(self, step: int, logs: bool) -> dict[str, Any] | None:
        batch, eos = self.batch, self.env.tokenizer.eos_id
        pairs = [self.encoded[i] for i in next(self.batches)]
        seqs = sequence_batch([c for c, _ in pairs] + [r for _, r in pairs], eos).to(self.device)
        scores, router_loss = sequence_scores(self.updater.role, seqs)
        loss, accuracy, margin = pairwise_reward_loss(scores[:batch], scores[batch:], self.env.rlhf.reward.margin or None)
        self.updater.step(loss + router_loss if router_loss is not None else loss)
        self.window.append((float(loss), float(accuracy), float(margin)))
        if not logs:
            return None
        n, window = len(self.window), self.window
        stats = self.env.mean_over_ranks({"loss": sum(w[0] for w in window) / n, "accuracy": sum(w[1] for w in window) / n,
                                          "margin": sum(w[2] for w in window) / n}, self.device)
        self.first_loss = stats["loss"] if self.first_loss is None else self.first_loss
        self.final_loss = stats["loss"]
        self.window = []
        return {**stats, "lr": self.updater.last_lr, "grad_norm": self.updater.last_grad_norm}

    def extra_state(self) -> dict[str, Any]:
        return {"batches": self.batches.state_dict(), "window": [list(w) for w in self.window],
                "first_loss": self.first_loss, "final_loss": self.final_loss}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.batches.load_state_dict(state["batches"])
        self.window = [(float(a), float(b), float(c)) for a, b, c in state["window"]]
        self.first_loss, self.final_loss = state["first_loss"], state["final_loss"]


@torch.no_grad()
def _evaluate(critic: RoleEngine, pairs: list, pad_id: int) -> dict[str, float]:
    """Held-out pair accuracy and mean score margin (every rank scores every pair)."""
    if not pairs:
        return {}
    critic.engine.eval()
    chosen, rejected = [], []
    for start in range(0, len(pairs), EVAL_CHUNK):
        chunk = pairs[start:start + EVAL_CHUNK]
        seqs = sequence_batch([c for c, _ in chunk] + [r for _, r in chunk], pad_id).to(critic.device)
        scores, _ = sequence_scores(critic, seqs)
        chosen.append(scores[:len(chunk)])
        rejected.append(scores[len(chunk):])
    critic.engine.train()
    c, r = torch.cat(chosen), torch.cat(rejected)
    return {"eval_accuracy": float((c > r).float().mean()), "eval_margin": float((c - r).mean())}
