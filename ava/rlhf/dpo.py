"""DPO (and IPO): preference optimisation against a frozen reference, no reward model, no sampling.

A sequence's log-prob is the sum over its response tokens (eos included) of
the policy's token log-probs; IPO's regression target assumes the per-token
average instead, so `loss_type: ipo` uses that. The reference is the stage's
starting policy, run as a DeepSpeed inference engine.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from ava.model import AvaForCausalLM
from ava.rlhf.data import SequenceBatch, encoded_preferences, rank_batches, sequence_batch
from ava.rlhf.engines import RoleEngine, build_engine
from ava.rlhf.losses import dpo_loss, masked_mean, masked_sum
from ava.rlhf.rollout import policy_logprobs
from ava.rlhf.stage import StageEnv, StageResult, StageSteps, Updater, fit_stage, stage_lr

EVAL_CHUNK = 32


def run_dpo(env: StageEnv, policy: AvaForCausalLM, reference: AvaForCausalLM | None
            ) -> tuple[StageResult, RoleEngine]:
    s, cfg, tok = env.rlhf.dpo, env.config, env.tokenizer
    assert reference is not None
    started = time.perf_counter()
    data = encoded_preferences(tok, s, env.task, env.seed, "rlhf.dpo.data_path", cfg.data.max_length,
                               cfg.data.truncation)
    encoded, held_encoded = data.train, data.held
    for note in data.notes("dpo", cfg.data.max_length):
        env.note(note)
    batch = s.batch_size or cfg.training.batch_size
    lr = stage_lr(env, s)
    world = env.process.world_size
    actor = build_engine(policy, cfg, "actor", env.zero_stage("actor"), micro_batch=2 * batch, world_size=world,
                         learning_rate=lr)
    ref = build_engine(reference, cfg, "reference", env.zero_stage("reference"), micro_batch=2 * batch,
                       world_size=world, trainable=False)
    env.note(f"dpo: {len(encoded)} pairs, {batch} pairs x {world} rank(s) per step, {s.loss_type} loss, "
             f"beta {s.beta:g}, lr {lr:g}, ZeRO stages actor {actor.zero_stage} / reference {ref.zero_stage}")
    steps = DPOSteps(env, Updater(actor, env, lr, s.warmup_steps, s.steps, "dpo"), ref, encoded, batch)
    average = s.loss_type == "ipo"
    result, evaluation = fit_stage(env, steps, s.steps, s.logging_steps,
                                   lambda: _evaluate(actor, ref, held_encoded, tok.eos_id, average))
    summary = {"first_loss": steps.first_loss, "final_loss": steps.final_loss,
               **{f"before/{k}": v for k, v in evaluation.before.items()},
               **{f"after/{k}": v for k, v in evaluation.after.items()}}
    return StageResult("dpo", status=result.status, steps=result.steps, seconds=time.perf_counter() - started,
                       summary=summary, health=steps.health()), actor


class DPOSteps(StageSteps):
    """One DPO step: a batch of preference pairs, the policy's and the reference's sequence log-probs, the loss."""

    stage = "dpo"

    def __init__(self, env: StageEnv, updater: Updater, reference: RoleEngine, encoded: list, batch: int) -> None:
        super().__init__(env, [updater])
        self.updater, self.reference, self.encoded, self.batch = updater, reference, encoded, batch
        self.batches = rank_batches(len(encoded), batch, env.process.rank, env.process.world_size, env.seed)
        self.window: list[dict[str, float]] = []
        self.first_loss: float | None = None
        self.final_loss: float | None = None

    def step(self, step: int, logs: bool) -> dict[str, Any] | None:
        s, batch = self.env.rlhf.dpo, self.batch
        average = s.loss_type == "ipo"
        pairs = [self.encoded[i] for i in next(self.batches)]
        seqs = sequence_batch([c for c, _ in pairs] + [r for _, r in pairs], self.env.tokenizer.eos_id).to(self.device)
        logp, _, router_loss = policy_logprobs(self.updater.role, seqs.input_ids)
        with torch.no_grad():
            ref_logp, _, _ = policy_logprobs(self.reference, seqs.input_ids)
        pi, rf = _sequence_logps(logp, seqs, average), _sequence_logps(ref_logp, seqs, average)
        losses, chosen_r, rejected_r = dpo_loss(pi[:batch], pi[batch:], rf[:batch], rf[batch:], s.beta, s.loss_type,
                                                s.label_smoothing)
        loss = losses.mean()
        self.updater.step(loss + router_loss if router_loss is not None else loss)
        self.window.append({"loss": float(loss), "accuracy": float((chosen_r > rejected_r).float().mean()),
                            "reward_margin": float((chosen_r - rejected_r).mean()),
                            "logp_margin": float((pi[:batch] - pi[batch:]).detach().mean())})
        if not logs:
            return None
        window = self.window
        stats = self.env.mean_over_ranks({k: sum(w[k] for w in window) / len(window) for k in window[0]}, self.device)
        self.first_loss = stats["loss"] if self.first_loss is None else self.first_loss
        self.final_loss = stats["loss"]
        self.window = []
        return {**stats, "lr": self.updater.last_lr, "grad_norm": self.updater.last_grad_norm}

    def extra_state(self) -> dict[str, Any]:
        return {"batches": self.batches.state_dict(), "window": list(self.window), "first_loss": self.first_loss,
                "final_loss": self.final_loss}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.batches.load_state_dict(state["batches"])
        self.window = [dict(w) for w in state["window"]]
        self.first_loss, self.final_loss = state["first_loss"], state["final_loss"]


def _sequence_logps(logp: torch.Tensor, seqs: SequenceBatch, average: bool) -> torch.Tensor:
    if average:
        return masked_mean(logp, seqs.response_mask, dim=1)
    return masked_sum(logp, seqs.response_mask, dim=1)


@torch.no_grad()
def _evaluate(actor: RoleEngine, ref: RoleEngine, pairs: list, pad_id: int, average: bool) -> dict[str, float]:
    """Held-out chosen-minus-rejected log-prob margin, and the share of pairs DPO's implicit reward orders right."""
    if not pairs:
        return {}
    actor.engine.eval()
    margins, ref_margins = [], []
    for start in range(0, len(pairs), EVAL_CHUNK):
        chunk = pairs[start:start + EVAL_CHUNK]
        n = len(chunk)
        seqs = sequence_batch([c for c, _ in chunk] + [r for _, r in chunk], pad_id).to(actor.device)
        pi = _sequence_logps(policy_logprobs(actor, seqs.input_ids)[0], seqs, average)
        rf = _sequence_logps(policy_logprobs(ref, seqs.input_ids)[0], seqs, average)
        margins.append(pi[:n] - pi[n:])
        ref_margins.append(rf[:n] - rf[n:])
    actor.engine.train()
    m, rm = torch.cat(margins), torch.cat(ref_margins)
    return {"eval_logp_margin": float(m.mean()), "eval_accuracy": float((m - rm > 0).float().mean())}
