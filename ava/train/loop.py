"""The training loop: a DeepSpeed engine over Ava's model, its LR schedule and its batches.

Kept free of console and file output: every logged step is handed to
`on_log` as a dict, and the caller decides where it goes (console, metrics
file, W&B). Loss values are read back to the host only on logging steps.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ava.config.schema import AvaConfig
from ava.data.batches import SequenceBatches
from ava.model import AvaForCausalLM
from ava.model.moe import summarise_moe_stats
from ava.model.summary import summarise_model
from ava.train import checkpoint
from ava.train.distributed import ProcessInfo
from ava.train.lr_schedule import LRSchedule


@dataclass
class TrainResult:
    """What a finished run reports."""

    steps: int
    losses: list[float] = field(default_factory=list)  # mean loss of every optimizer step
    eval_loss: float | None = None
    tokens: int = 0
    seconds: float = 0.0
    first_step_seconds: float = 0.0


def total_steps(config: AvaConfig, batches_per_epoch: int, accumulation: int) -> int:
    """max_steps when set, else num_epochs passes over this rank's batches."""
    if config.training.max_steps is not None:
        return config.training.max_steps
    return max(1, config.training.num_epochs * batches_per_epoch // accumulation)


def _forever(batches: SequenceBatches) -> Iterator[torch.Tensor]:
    while True:
        yield from batches


def evaluate(engine: torch.nn.Module, batches: SequenceBatches, max_batches: int | None = None) -> float:
    """Mean next-token loss (language-model part only) over the evaluation batches."""
    was_training = engine.training
    engine.eval()
    total, count = torch.zeros(()), 0
    with torch.no_grad():
        for i, batch in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            out = engine(batch.to(_device(engine)), labels=batch.to(_device(engine)))
            total += out.lm_loss.float().cpu()
            count += 1
    engine.train(was_training)
    if count == 0:
        return math.nan
    mean = total / count
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(mean)
        mean /= torch.distributed.get_world_size()
    return float(mean)


def _device(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def train(config: AvaConfig, ds_config: dict, process: ProcessInfo, train_batches: SequenceBatches,
          eval_batches: SequenceBatches | None, on_log: Callable[[dict], None],
          checkpoint_dir: Path | None = None, resume_from: Path | None = None, keep_last: int = 3) -> TrainResult:
    """Train `config.model` under DeepSpeed with `ds_config`; returns per-step losses and the final eval loss.

    With `checkpoint_dir`, a checkpoint is written every `save_steps` and at the
    end; with `resume_from` (a checkpoint's directory), training continues from it exactly
    where it stopped (weights, optimizer, LR schedule, data position, RNG).
    """
    import deepspeed

    start = time.perf_counter()
    torch.manual_seed(config.data.shuffle_seed)
    model = AvaForCausalLM(config.model, gradient_checkpointing=config.training.gradient_checkpointing)
    if config.deepspeed.zero_stage == 3 and config.model.is_moe:
        from ava.model.zero3 import mark_moe_zero3_leaves

        mark_moe_zero3_leaves(model)
    accumulation = ds_config["gradient_accumulation_steps"]
    steps = total_steps(config, train_batches.batches_per_epoch, accumulation)
    t = config.training
    schedule = LRSchedule(peak=t.learning_rate, end=t.lr_end, warmup_steps=min(t.warmup_steps, steps),
                          total_steps=steps, warmup=t.warmup_schedule, decay=t.lr_scheduler_type)
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule.multiplier))
    flops_per_token = summarise_model(model, config.data.max_length).training_flops_per_token
    device = _device(engine)
    start_step = 0
    if resume_from is not None:
        state = checkpoint.load(engine, resume_from.parent, resume_from.name, process.rank)
        start_step = int(state["step"])
        train_batches.load_state_dict(state["data"])
    stream = _forever(train_batches)
    result = TrainResult(steps=steps)
    save_every = t.save_steps if t.save_strategy == "steps" else 0
    step_losses: list[torch.Tensor] = []  # tensors until the end: no host sync per step
    tokens_per_step = ds_config["train_batch_size"] * config.data.max_length
    window_start, window_tokens = time.perf_counter(), 0
    for step in range(start_step, steps):
        step_loss = torch.zeros((), device=device)
        stats = []
        for _ in range(accumulation):
            batch = next(stream).to(device)
            out = engine(batch, labels=batch)
            engine.backward(out.loss)
            engine.step()
            step_loss += out.loss.detach().float() / accumulation
            stats = out.moe_stats
        step_losses.append(step_loss)
        window_tokens += tokens_per_step
        if step == start_step:
            result.first_step_seconds = time.perf_counter() - start
        if (step + 1) % t.logging_steps == 0 or step + 1 == steps:
            elapsed = time.perf_counter() - window_start
            record = {"step": step + 1, "loss": float(step_loss), "lm_loss": float(out.lm_loss.detach()),
                      "lr": engine.get_lr()[0], "tokens_per_s": window_tokens / elapsed,
                      "mfu_flops_per_s": flops_per_token * window_tokens / elapsed}
            if out.router_loss is not None:
                record["router_loss"] = float(out.router_loss.detach())
            grad_norm = engine.get_global_grad_norm()
            if grad_norm is not None:
                record["grad_norm"] = float(grad_norm)
            record.update(summarise_moe_stats(stats))
            on_log(record)
            window_start, window_tokens = time.perf_counter(), 0
        if checkpoint_dir is not None and ((save_every and (step + 1) % save_every == 0) or step + 1 == steps):
            checkpoint.save(engine, checkpoint_dir, step + 1, process.rank, train_batches.state_dict(), keep_last)
    result.losses = torch.stack(step_losses).cpu().tolist() if step_losses else []
    result.tokens = (steps - start_step) * tokens_per_step
    if eval_batches is not None:
        result.eval_loss = evaluate(engine, eval_batches)
        on_log({"step": steps, "eval_loss": result.eval_loss, "eval_perplexity": math.exp(min(result.eval_loss, 50))})
    result.seconds = time.perf_counter() - start
    return result
