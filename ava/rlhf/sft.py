"""Supervised fine-tuning: next-token loss on the response tokens of prompt/response pairs.

Examples are packed several to a row when `packing` is on; each keeps its own
segment id, so attention stays inside it and positions restart, and the
prompt tokens carry no label. The loss is therefore the same as training on
the examples one at a time, only faster.
"""

from __future__ import annotations

import time

import torch

from ava.model import AvaForCausalLM
from ava.model.transformer import IGNORE_INDEX
from ava.rlhf.data import Prompt, encode, rank_batches, sft_data, sft_rows
from ava.rlhf.engines import RoleEngine, build_engine
from ava.rlhf.evaluation import evaluate_prompts
from ava.rlhf.rewards import Scorer
from ava.rlhf.stage import StageEnv, StageResult, Updater, stage_lr


def run_sft(env: StageEnv, policy: AvaForCausalLM, scorer: Scorer | None) -> tuple[StageResult, RoleEngine]:
    """Train `policy` on demonstrations; returns the result and the trained engine (for saving)."""
    s, cfg, tok = env.rlhf.sft, env.config, env.tokenizer
    started = time.perf_counter()
    train, held = sft_data(s.data_path, env.task, s.num_examples, s.eval_examples, env.seed, "rlhf.sft.data_path",
                           env.rlhf.task.demonstration_error_rate)
    rows = sft_rows([encode(tok, p, r) for p, r in train], cfg.data.max_length, tok.eos_id, s.packing)
    if rows.dropped:
        env.note(f"sft: {rows.dropped} example(s) longer than data.max_length = {cfg.data.max_length} left out")
    held_rows = sft_rows([encode(tok, p, r) for p, r in held], cfg.data.max_length, tok.eos_id, packing=False)
    batch = s.batch_size or cfg.training.batch_size
    lr = stage_lr(env, s)
    actor = build_engine(policy, cfg, "actor", env.zero_stage("actor"), micro_batch=batch,
                         world_size=env.process.world_size, learning_rate=lr)
    env.note(f"sft: {len(train)} examples in {rows.input_ids.shape[0]} rows of {rows.input_ids.shape[1]} tokens "
             f"({'packed' if s.packing else 'one per row'}), {batch} rows x {env.process.world_size} rank(s) per step, "
             f"lr {lr:g}, ZeRO stage {actor.zero_stage}")
    updater = Updater(actor, env, lr, s.warmup_steps, s.steps, "sft")
    held_prompts = [Prompt(p, r) for p, r in held]
    before = _evaluate(env, actor, held_rows, held_prompts, scorer)
    env.log({"stage": "sft", "step": 0, **before})
    batches = rank_batches(rows.input_ids.shape[0], batch, env.process.rank, env.process.world_size, env.seed)
    device = actor.device
    losses: list[torch.Tensor] = []
    window, tokens = time.perf_counter(), 0
    for step in range(1, s.steps + 1):
        index = next(batches)
        ids, labels = rows.input_ids[index].to(device), rows.labels[index].to(device)
        out = actor.forward(ids, labels=labels, segment_ids=rows.segment_ids[index].to(device))
        updater.step(out.loss)
        losses.append(out.lm_loss.detach().float())
        tokens += int((labels != IGNORE_INDEX).sum()) * env.process.world_size
        if step % s.logging_steps == 0 or step == s.steps:
            stats = env.mean_over_ranks({"loss": float(torch.stack(losses[-s.logging_steps:]).mean())}, device)
            elapsed = time.perf_counter() - window
            env.log({"stage": "sft", "step": step, **stats, "lr": updater.last_lr, "grad_norm": updater.last_grad_norm,
                     "response_tokens_per_s": tokens / elapsed if elapsed > 0 else None})
            window, tokens = time.perf_counter(), 0
    after = _evaluate(env, actor, held_rows, held_prompts, scorer)
    env.log({"stage": "sft", "step": s.steps, **after})
    summary = {"first_loss": float(losses[0]), "final_loss": float(losses[-1]),
               **{f"before/{k}": v for k, v in before.items() if k != "eval_samples"},
               **{f"after/{k}": v for k, v in after.items() if k != "eval_samples"},
               "samples": after.get("eval_samples", [])}
    result = StageResult("sft", steps=s.steps, seconds=time.perf_counter() - started, summary=summary,
                         health=updater.health.summary() if updater.health else None)
    return result, actor


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
