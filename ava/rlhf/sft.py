"""Supervised fine-tuning: next-token loss on the response tokens of prompt/response pairs.

Examples are packed several to a row when `packing` is on; each keeps its own
segment id, so attention stays inside it and positions restart, and the
prompt tokens carry no label. The loss is therefore the same as training on
the examples one at a time, only faster.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from ava.model import AvaForCausalLM
from ava.model.penalties import LossPenalties
from ava.model.transformer import IGNORE_INDEX
from ava.rlhf.data import Prompt, SFTRows, encode, rank_batches, sft_data, sft_rows
from ava.rlhf.engines import RoleEngine, build_engine
from ava.rlhf.evaluation import evaluate_prompts
from ava.rlhf.rewards import Scorer
from ava.rlhf.stage import StageEnv, StageResult, StageSteps, Updater, fit_stage, stage_lr


def run_sft(env: StageEnv, policy: AvaForCausalLM, scorer: Scorer | None) -> tuple[StageResult, RoleEngine]:
    """Train `policy` on demonstrations; returns the result and the trained engine (for saving)."""
    s, cfg, tok = env.rlhf.sft, env.config, env.tokenizer
    started = time.perf_counter()
    train, held = sft_data(s.data_path, env.task, s.num_examples, s.eval_examples, env.seed, "rlhf.sft.data_path",
                           env.rlhf.task.demonstration_error_rate)
    rows = sft_rows([encode(tok, p, r) for p, r in train], cfg.data.max_length, tok.eos_id, s.packing,
                    truncate=cfg.data.truncation)
    for note in rows.notes("sft", cfg.data.max_length):
        env.note(note)
    held_rows = sft_rows([encode(tok, p, r) for p, r in held], cfg.data.max_length, tok.eos_id, packing=False,
                         truncate=cfg.data.truncation)
    batch = s.batch_size or cfg.training.batch_size
    lr = stage_lr(env, s)
    actor = build_engine(policy, cfg, "actor", env.zero_stage("actor"), micro_batch=batch,
                         world_size=env.process.world_size, learning_rate=lr)
    env.note(f"sft: {len(train)} examples in {rows.input_ids.shape[0]} rows of {rows.input_ids.shape[1]} tokens "
             f"({'packed' if s.packing else 'one per row'}), {batch} rows x {env.process.world_size} rank(s) per step, "
             f"lr {lr:g}, ZeRO stage {actor.zero_stage}")
    penalties = LossPenalties.from_training(cfg.training, tok.eos_id)
    if penalties is not None:
        env.note(f"sft: loss penalties on: {', '.join(penalties.names)} (training.*_weight; logged by name)")
    steps = SFTSteps(env, Updater(actor, env, lr, s.warmup_steps, s.steps, "sft"), rows, batch, penalties)
    held_prompts = [Prompt(p, r) for p, r in held]
    result, evaluation = fit_stage(env, steps, s.steps, s.logging_steps,
                                   lambda: _evaluate(env, actor, held_rows, held_prompts, scorer))
    before, after = evaluation.before, evaluation.after
    summary = {"first_loss": steps.losses[0] if steps.losses else None,
               "final_loss": steps.losses[-1] if steps.losses else None,
               **{f"before/{k}": v for k, v in before.items() if k != "eval_samples"},
               **{f"after/{k}": v for k, v in after.items() if k != "eval_samples"},
               "samples": after.get("eval_samples", [])}
    return StageResult("sft", status=result.status, steps=result.steps, seconds=time.perf_counter() - started,
                       summary=summary, health=steps.health()), actor


class SFTSteps(StageSteps):
    """One SFT step: a micro batch of (packed) rows, the next-token loss on their response tokens.

    With loss penalties (`ava.model.penalties`) each example is a document and
    the early-end term counts the response's length, not the prompt's.
    """

    stage = "sft"

    def __init__(self, env: StageEnv, updater: Updater, rows: SFTRows, batch: int,
                 penalties: LossPenalties | None = None) -> None:
        super().__init__(env, [updater])
        self.updater, self.rows, self.penalties = updater, rows, penalties
        self.logging_steps = env.rlhf.sft.logging_steps
        self.batches = rank_batches(rows.input_ids.shape[0], batch, env.process.rank, env.process.world_size,
                                    env.seed)
        self.losses: list[float] = []  # every step's loss on this rank, read on logging steps only
        self._pending: list[torch.Tensor] = []
        self._penalties: dict[str, list[torch.Tensor]] = {}  # each penalty's terms since the last logging step
        self._window: float | None = None  # starts at this process's first step (after evaluation, any resume)
        self._tokens = 0

    def step(self, step: int, logs: bool) -> dict[str, Any] | None:
        rows, device, world = self.rows, self.device, self.env.process.world_size
        if self._window is None:
            self._window = time.perf_counter()
        index = next(self.batches)
        ids, labels = rows.input_ids[index].to(device), rows.labels[index].to(device)
        segments = rows.segment_ids[index].to(device)
        out = self.updater.role.forward(ids, labels=labels, segment_ids=segments)
        loss = out.loss
        if self.penalties is not None:  # every example starts inside its row: its length is known
            for name, term in self.penalties(out.logits, ids, labels, segments, torch.ones_like(ids, dtype=torch.bool)
                                             ).items():
                loss = loss + term
                self._penalties.setdefault(name, []).append(term.detach().float())
        self.updater.step(loss)
        self._pending.append(out.lm_loss.detach().float())
        self._tokens += int((labels != IGNORE_INDEX).sum()) * world
        if not logs:
            return None
        self.losses += torch.stack(self._pending).tolist()
        self._pending = []
        recent = torch.tensor(self.losses[-self.logging_steps:], dtype=torch.float32)
        penalties = {name: float(torch.stack(terms).mean()) for name, terms in self._penalties.items()}
        self._penalties = {}
        stats = self.env.mean_over_ranks({"loss": float(recent.mean()), **penalties}, device)
        elapsed = time.perf_counter() - self._window
        record = {**stats, "lr": self.updater.last_lr, "grad_norm": self.updater.last_grad_norm,
                  "response_tokens_per_s": self._tokens / elapsed if elapsed > 0 else None}
        self._window, self._tokens = time.perf_counter(), 0
        return record

    def extra_state(self) -> dict[str, Any]:
        self.losses += torch.stack(self._pending).tolist() if self._pending else []
        self._pending = []
        return {"batches": self.batches.state_dict(), "losses": list(self.losses)}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.batches.load_state_dict(state["batches"])
        self.losses = [float(v) for v in state["losses"]]


@torch.no_grad()
def _evaluate(env: StageEnv, actor: RoleEngine, held, prompts: list[Prompt], scorer: Scorer | None) -> dict:
    """Held-out response loss (teacher-forced) and the reward of greedy answers."""
    if not prompts:
        return {}
    actor.engine.eval()
    device = actor.device
    total, count = 0.0, 0
    for start in range(0, held.input_ids.shape[0], 16):
        ids, labels = held.input_ids[start:start + 16].to(device), held.labels[start:start + 16].to(device)
        out = actor.forward(ids, labels=labels, segment_ids=held.segment_ids[start:start + 16].to(device))
        n = int((labels[:, 1:] != IGNORE_INDEX).sum())
        total, count = total + float(out.lm_loss) * n, count + n
    actor.engine.train()
    return {"eval_loss": total / count if count else None,
            **evaluate_prompts(actor, prompts, env.tokenizer, env.rlhf.generation, scorer)}
