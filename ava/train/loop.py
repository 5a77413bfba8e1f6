"""The training loop: a DeepSpeed engine over Ava's model, its LR schedule and its batches.

Kept free of console and file output: every logged step and evaluation is
handed to `on_log` as a dict, and the caller decides where it goes (console,
metrics file, W&B). Loss values are read back to the host only on logging
steps, where they are also averaged over the data-parallel ranks, so the
logged loss is the loss of the whole global batch on any number of ranks.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import torch

from ava.config.schema import AvaConfig
from ava.data.batches import Batches, SequenceBatches
from ava.model import AvaForCausalLM
from ava.model.compile import ZERO3_COMPILE_WARNING, compile_pays
from ava.model.lora import ParameterReport, prepare_trainable
from ava.model.moe import summarise_moe_stats
from ava.model.store import load_state_exactly
from ava.model.summary import summarise_model
from ava.train import checkpoint
from ava.train.batch_context import BatchContext
from ava.train.distributed import ProcessInfo
from ava.train.evaluation import EvalMonitor, evaluate, perplexity
from ava.train.expert_parallel import expert_parallel_engine, prepare_expert_parallel
from ava.train.faults import FaultPlan
from ava.train.gradient_health import HealthMonitor
from ava.train.host_memory import keep_freed_memory
from ava.train.lr_schedule import LRSchedule
from ava.train.precision import PrecisionReport, apply_precision
from ava.train.preemption import PreemptionFlag
from ava.train.retrieval import RetrievalPlan
from ava.train.router_balance import add_loads, balance_router_biases
from ava.train.update_gate import UpdateGate, clip_in_use, layer_grad_norms, set_clip, set_lr

SAMPLE_PROMPT_TOKENS = 32


@dataclass
class TrainResult:
    """What a finished run reports."""

    steps: int  # optimizer steps completed (fewer than planned when stopped early)
    planned_steps: int = 0
    # or "early_stopped", "preempted" (a stop signal: checkpointed), "failed" (unrecoverable gradient health)
    status: str = "completed"
    failure: str | None = None  # why the run failed
    losses: list[float] = field(default_factory=list)  # global-batch loss of every step this process ran
    eval_loss: float | None = None  # the last evaluation
    best_eval_loss: float | None = None
    best_step: int | None = None
    evaluations: int = 0
    tokens: int = 0
    seconds: float = 0.0
    first_step_seconds: float = 0.0
    checkpoint: Path | None = None  # the final checkpoint
    checkpoint_reload_ok: bool | None = None  # the final checkpoint reloaded and gave the same loss
    sample: tuple[list[int], list[int]] | None = None  # (prompt ids, generated ids)
    model: AvaForCausalLM | None = field(default=None, repr=False)  # the trained module (for export)
    precision: PrecisionReport | None = None
    health: dict[str, Any] | None = None  # the gradient-health monitor's interventions
    parameters: ParameterReport | None = None  # total / trainable / LoRA counts
    lora_scaling: float | None = None  # alpha / r when LoRA adapters were trained (export merges them)
    warnings: list[str] = field(default_factory=list)  # configuration warnings raised while setting up


def total_steps(config: AvaConfig, batches_per_epoch: int, accumulation: int) -> int:
    """max_steps when set, else num_epochs passes over this rank's batches."""
    if config.training.max_steps is not None:
        return config.training.max_steps
    return max(1, config.training.num_epochs * batches_per_epoch // accumulation)


def _forever(batches: Batches) -> Iterator[torch.Tensor]:
    while True:
        yield from batches


def _held_out(batches: SequenceBatches, limit: int | None = None) -> Iterator[torch.Tensor]:
    """The held-out batches from the first, every time (the batches object remembers its position)."""
    batches.load_state_dict({"epoch": 0, "batch_index": 0})
    return islice(iter(batches), limit)


def _device(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def _mean_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """Average a tensor over the data-parallel ranks (one collective)."""
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        values = values.clone()
        torch.distributed.all_reduce(values)
        values /= torch.distributed.get_world_size()
    return values


class _Schedule:
    """Which steps log, evaluate and save."""

    def __init__(self, config: AvaConfig, steps: int, steps_per_epoch: int) -> None:
        t = config.training
        self.steps, self.log_every = steps, t.logging_steps
        self.eval_every = {"steps": t.eval_steps, "epoch": steps_per_epoch, "no": 0}[t.eval_strategy]
        self.save_every = {"steps": t.save_steps, "epoch": steps_per_epoch, "best": 0, "no": 0}[t.save_strategy]
        # save_strategy best writes only improvements: no final checkpoint unless it is the best.
        self.saves_at_end = t.save_strategy != "best"

    def logs(self, step: int) -> bool:
        return step % self.log_every == 0 or step == self.steps

    def evaluates(self, step: int) -> bool:
        return bool(self.eval_every) and (step % self.eval_every == 0 or step == self.steps)

    def saves(self, step: int) -> bool:
        return bool(self.save_every) and step % self.save_every == 0


def train(config: AvaConfig, ds_config: dict, process: ProcessInfo, train_batches: Batches,
          eval_batches: SequenceBatches | None, on_log: Callable[[dict], None],
          checkpoint_dir: Path | None = None, resume_from: Path | None = None, keep_last: int | None = None,
          verify_checkpoint: bool = True, faults: FaultPlan | None = None,
          on_note: Callable[[str], None] | None = None, preemption: PreemptionFlag | None = None,
          initial_weights: Callable[[], dict[str, torch.Tensor]] | None = None,
          on_warning: Callable[[str], None] | None = None,
          retrieval: RetrievalPlan | None = None) -> TrainResult:
    """Train `config.model` under DeepSpeed with `ds_config`.

    Evaluates every `eval_steps` (and at the end), keeps the best checkpoint
    by evaluation loss, stops early after `early_stopping_patience`
    evaluations without improvement, and ends with a greedy sample from a
    held-out prompt. With `checkpoint_dir`, checkpoints are written every
    `save_steps` and at the end, and the final one is reloaded to prove it
    restores the same model (`verify_checkpoint`). With `resume_from`,
    training continues exactly where that checkpoint stopped.

    With `training.gradient_health` enabled, every step's update passes the
    health gate: bad steps are skipped, explosions reduce the LR for a
    cool-down, and too many bad steps in a row roll back to the last
    checkpoint, skipping the batches since (`ava.train.gradient_health`).
    `faults` injects numerical faults for tests (`ava.train.faults`). When
    `preemption` has caught a stop signal on any rank, every rank finishes the
    step, saves a checkpoint and returns with status "preempted".

    `initial_weights()` (from `training.init_from`) replaces the random
    initialisation; `training.lora` then wraps the model in adapters and
    freezes what it says. The parameter report goes to `on_note` and the LoRA
    misconfiguration warnings to `on_warning` before the first step.

    `retrieval` gives each batch what it reads besides its tokens: retrieved
    neighbours and document ids (`ava.train.retrieval`, `ava.train.batch_context`).
    """
    import deepspeed

    start = time.perf_counter()
    t = config.training
    keep_last = t.keep_last_checkpoints if keep_last is None else keep_last
    torch.manual_seed(config.data.shuffle_seed)
    model = AvaForCausalLM(config.model, gradient_checkpointing=t.gradient_checkpointing)
    if initial_weights is not None and resume_from is None:  # a resumed run's checkpoint replaces them anyway
        load_state_exactly(model, initial_weights(), f"training.init_from {t.init_from}", allow_feature_added=True)
    lora_scaling, parameters, warnings = prepare_trainable(model, t.lora, from_scratch=t.init_from is None)
    if on_note is not None:
        on_note(parameters.line())
    for warning in warnings:
        (on_warning or on_note or (lambda _: None))(warning)
    batch_context = None
    if retrieval is not None:  # the store's vectors come from the embedding the run starts from
        batch_context = retrieval.open(model.embed_tokens.weight.detach(), process.rank, process.world_size, on_note)
    if config.deepspeed.zero_stage == 3 and (config.model.is_moe or config.model.routes_attention):
        from ava.model.zero3 import mark_moe_zero3_leaves

        mark_moe_zero3_leaves(model)
    accumulation = ds_config["gradient_accumulation_steps"]
    steps = total_steps(config, train_batches.batches_per_epoch, accumulation)
    schedule = LRSchedule(peak=t.learning_rate, end=t.lr_end, warmup_steps=min(t.warmup_steps, steps),
                          total_steps=steps, warmup=t.warmup_schedule, decay=t.lr_scheduler_type)
    # Counted before expert parallelism keeps only this rank's experts.
    flops_per_token = summarise_model(model, config.data.max_length).training_flops_per_token
    precision = apply_precision(model, config)
    if on_note is not None:
        for note in precision.notes:
            on_note(note)
    model_parameters = prepare_expert_parallel(model, config.deepspeed.ep_size)
    with expert_parallel_engine(model):
        engine, _, _, _ = deepspeed.initialize(
            model=model, model_parameters=model_parameters, config=ds_config)
    device = _device(engine)
    if device.type == "cpu" and config.hardware.keep_freed_host_memory and keep_freed_memory() and on_note:
        on_note("host memory: freed blocks are kept for reuse (glibc malloc thresholds raised), so steps do not "
                "page-fault fresh memory")
    if compile_pays(t.compile, device, config.deepspeed.zero_stage):
        model.use_compiled_blocks()
        if config.deepspeed.zero_stage == 3:
            (on_warning or on_note or (lambda _: None))(ZERO3_COMPILE_WARNING)
        if on_note is not None:
            on_note(f"torch.compile: on for the {len(model.layers)} transformer blocks (training.compile: "
                    f"{t.compile}); the first step includes the compilation")
    monitor = EvalMonitor(t.early_stopping_patience, t.early_stopping_threshold)
    health = HealthMonitor(t.gradient_health) if t.gradient_health.enabled else None
    gate = UpdateGate(engine, health) if health is not None else None
    start_step = 0
    if resume_from is not None:
        state = checkpoint.load(engine, resume_from.parent, resume_from.name, process.rank)
        start_step = int(state["step"])
        train_batches.load_state_dict(state["data"])
        if "monitor" in state:
            monitor.load_state_dict(state["monitor"])
        if health is not None and "health" in state:
            health.load_state_dict(state["health"])
    plan = _Schedule(config, steps, max(1, train_batches.batches_per_epoch // accumulation))
    stream = _forever(train_batches)
    result = TrainResult(steps=start_step, planned_steps=steps, precision=precision, parameters=parameters,
                         lora_scaling=lora_scaling, warnings=warnings)
    step_losses: list[torch.Tensor] = []  # tensors until the end: no host sync per step
    # The language-model part of each step's loss: what evaluation measures, so the train/validation gap
    # compares like with like (the total adds the MoE router losses).
    step_lm_losses: list[torch.Tensor] = []
    since_eval = 0  # index into step_lm_losses of the first step after the previous evaluation
    if resume_from is not None:
        result.checkpoint = resume_from  # a resumed run that saves nothing new still has its checkpoint
    tokens_per_step = ds_config["train_batch_size"] * config.data.max_length
    window_start, window_tokens = time.perf_counter(), 0
    saved_step = start_step if resume_from is not None else None

    def save(step: int) -> None:
        nonlocal saved_step
        if checkpoint_dir is not None and saved_step != step:
            at = (lambda point: faults.at_save(step, process.rank, point)) if faults is not None else None
            result.checkpoint = checkpoint.save(engine, checkpoint_dir, step, process.rank,
                                                train_batches.state_dict(), keep_last,
                                                extra=client_state(), at=at)
            saved_step = step

    def client_state() -> dict[str, Any]:
        return {"monitor": monitor.state_dict(), **({"health": health.state_dict()} if health else {})}

    def roll_back(step: int) -> int | None:
        """Reload the last complete checkpoint; the data stream goes on past the bad batches. None: impossible."""
        nonlocal saved_step
        assert health is not None
        tag = checkpoint.latest_complete(checkpoint_dir) if checkpoint_dir is not None else None
        if tag is None or checkpoint_dir is None or health.rollbacks_exhausted:
            return None
        state = checkpoint.load(engine, checkpoint_dir, tag, process.rank)
        to_step = int(state["step"])
        if "monitor" in state:
            monitor.load_state_dict(state["monitor"])
        health.rolled_back(step, to_step, (step - to_step) * accumulation)
        saved_step = to_step
        return to_step

    if resume_from is not None and (start_step >= steps or monitor.should_stop):
        # Training had ended (all steps, or early stopping) before the process stopped, e.g. killed while
        # exporting: finish the run from its final checkpoint instead of training on or reporting it unevaluated.
        if start_step < steps:
            result.status = "early_stopped"
        steps = start_step
        if eval_batches is not None:
            result.eval_loss = evaluate(engine, _held_out(eval_batches), batch_context)
            result.evaluations += 1
    measure_layers = health is not None and t.gradient_health.layer_grad_norms
    balances_bias = config.model.is_moe and config.model.router_type == "aux_loss_free"
    step = start_step
    while step < steps:
        step += 1
        logs = plan.logs(step)
        set_lr(engine, schedule.lr(step - 1) * (health.lr_scale if health else 1.0))
        if health is not None:
            set_clip(engine, health.clip_value(step))
        step_loss = torch.zeros((), device=device)
        lm_loss = torch.zeros((), device=device)
        router_loss = torch.zeros((), device=device)
        layer_norms: dict[str, float] = {}
        stats: list = []
        attention_stats: list = []
        step_loads: list[torch.Tensor] = []  # per MoE layer, summed over the step's micro batches
        for micro in range(accumulation):
            host = next(stream)
            read = batch_context(host, device) if batch_context is not None else None
            batch = host.to(device)
            with precision.autocast():
                out = engine(batch, labels=batch, context=read)
            loss = out.loss if faults is None or micro else faults.apply(step, process.rank, out.loss)
            engine.backward(loss)
            step_loss += loss.detach().float() / accumulation
            lm_loss += out.lm_loss.detach().float() / accumulation
            if out.router_loss is not None:
                router_loss += out.router_loss.detach().float() / accumulation
            stats, attention_stats = out.moe_stats, out.attention_stats
            if balances_bias:
                step_loads = add_loads(step_loads, stats)
            if micro == accumulation - 1:
                if logs and measure_layers:
                    layer_norms = layer_grad_norms(engine.module)
                if gate is not None:
                    gate.begin(step, step_loss, measure_update=logs and measure_layers)
            engine.step()
        step_losses.append(step_loss)
        step_lm_losses.append(lm_loss)
        verdict = gate.finish() if gate is not None else None
        if balances_bias and (verdict is None or verdict.apply):
            balance_router_biases(engine.module, step_loads, config.model.router_bias_update_rate)
        if health is not None and verdict is not None:
            health.end_step(step, verdict)
            for event in health.drain_events():
                on_log(event)
        window_tokens += tokens_per_step
        result.steps = step
        if step == start_step + 1:
            result.first_step_seconds = time.perf_counter() - start
        if logs:
            elapsed = time.perf_counter() - window_start
            loss, lm, router = _mean_over_ranks(torch.stack([step_loss, lm_loss, router_loss])).tolist()
            record = {"step": step, "loss": loss, "lm_loss": lm, "lr": engine.get_lr()[0],
                      "tokens_per_s": window_tokens / elapsed,
                      "mfu_flops_per_s": flops_per_token * window_tokens / elapsed}
            if config.model.is_moe or config.model.routes_attention:
                record["router_loss"] = router
            norm = gate.grad_norm if gate is not None else engine.get_global_grad_norm()
            if norm is not None:
                record["grad_norm"] = float(norm) if math.isfinite(norm) else str(norm)
            if health is not None:
                record["clip"] = clip_in_use(engine)
                record["update_applied"] = bool(verdict and verdict.apply)
                record.update(health.signals())
                if gate is not None and gate.update_ratio is not None:
                    record["update_to_weight"] = gate.update_ratio
                if gate is not None and gate.weight_norm is not None:
                    record["weight_norm"] = gate.weight_norm
                record.update(layer_norms)
            record.update(summarise_moe_stats([*stats, *attention_stats]))
            on_log(record)
            window_start, window_tokens = time.perf_counter(), 0
        if health is not None and verdict is not None and verdict.rollback:
            to_step = roll_back(step)
            for event in health.drain_events():
                on_log(event)
            if to_step is None:
                result.status, result.failure = "failed", _unrecoverable(config, health, step)
                on_log({"step": step, "event": "run_failed", "reason": result.failure})
                break
            del step_losses[max(0, to_step - start_step):]
            del step_lm_losses[max(0, to_step - start_step):]
            since_eval = min(since_eval, len(step_lm_losses))
            step = result.steps = to_step
            continue
        new_best = False
        if eval_batches is not None and plan.evaluates(step):
            result.eval_loss = evaluate(engine, _held_out(eval_batches), batch_context)
            result.evaluations += 1
            new_best = monitor.update(step, result.eval_loss)
            record = {"step": step, "eval_loss": result.eval_loss, "eval_perplexity": perplexity(result.eval_loss),
                      "best_eval_loss": monitor.best_loss}
            recent = step_lm_losses[since_eval:]
            if recent:  # the train/validation gap, over the steps since the previous evaluation (or the (re)start)
                train_loss = float(_mean_over_ranks(torch.stack(recent).mean()))
                record.update(train_loss=train_loss, train_val_gap=result.eval_loss - train_loss)
            since_eval = len(step_lm_losses)
            on_log(record)
            window_start = time.perf_counter()  # evaluation time is not training throughput
        stopping = monitor.should_stop
        # A skipped step saves no checkpoint: a rollback must land on weights from a healthy step.
        healthy = verdict is None or verdict.apply
        saves_best = new_best and (t.save_best_checkpoint or t.save_strategy == "best")
        if (plan.saves(step) and healthy) or (plan.saves_at_end and (step == steps or stopping)) or saves_best:
            save(step)
            if saves_best and checkpoint_dir is not None and process.rank == 0:
                checkpoint.mark_best(checkpoint_dir, step)
                checkpoint.prune(checkpoint_dir, keep_last)  # the previous best is no longer protected
            if step != steps and not stopping:
                window_start = time.perf_counter()
        if preemption is not None and preemption.agreed(device):
            save(step)
            result.status = "preempted"
            on_log({"step": step, "event": "preempted",
                    "reason": f"{preemption.signal_name or 'a stop signal'} received (on some rank): checkpoint "
                              f"saved at step {step}; the run can resume from it"})
            break
        if stopping:
            result.status = "early_stopped"
            on_log({"step": step, "event": "early_stop",
                    "reason": f"{monitor.evals_without_improvement} evaluations without an improvement of more "
                              f"than {monitor.threshold} on the best eval loss {monitor.best_loss:.4f} "
                              f"(step {monitor.best_step})"})
            break
    if step_losses:
        result.losses = _mean_over_ranks(torch.stack(step_losses)).cpu().tolist()
    result.tokens = (result.steps - start_step) * tokens_per_step
    result.best_eval_loss = monitor.best_loss if monitor.best_step is not None else None
    result.best_step = monitor.best_step
    result.health = health.summary() if health is not None else None
    if eval_batches is not None:
        result.sample = _sample(engine.module, eval_batches, t.sample_max_new_tokens, device)
        if verify_checkpoint and result.checkpoint is not None and saved_step == result.steps:
            result.checkpoint_reload_ok = _reload_matches(engine, result.checkpoint, eval_batches, process.rank,
                                                          batch_context)
    result.model = engine.module
    result.seconds = time.perf_counter() - start
    return result


def _unrecoverable(config: AvaConfig, health: HealthMonitor, step: int) -> str:
    """Why a run with repeated bad steps cannot go on, and what to change."""
    h = config.training.gradient_health
    bad = f"{h.max_consecutive_bad_steps} bad steps in a row at step {step}"
    if health.rollbacks_exhausted:
        return (f"{bad} after {health.rollbacks} rollbacks (training.gradient_health.max_rollbacks): training "
                "is not recovering. Lower training.learning_rate, or inspect the data around this step")
    return (f"{bad} and no checkpoint to roll back to. Save more often (training.save_steps, now "
            f"{config.training.save_steps}; save_strategy {config.training.save_strategy}) or lower "
            "training.learning_rate")


def _sample(model: AvaForCausalLM, eval_batches: SequenceBatches, max_new_tokens: int,
            device: torch.device) -> tuple[list[int], list[int]] | None:
    """A greedy continuation of the first held-out sequence's opening tokens (the same on every rank)."""
    limit = model.config.max_position_embeddings
    first = next(_held_out(eval_batches, 1), None)
    if first is None or max_new_tokens <= 0:
        return None
    prompt_len = min(SAMPLE_PROMPT_TOKENS, first.shape[1], max(1, limit // 2))
    new_tokens = min(max_new_tokens, limit - prompt_len)
    prompt = first[:1, :prompt_len].to(device)
    out = model.generate(prompt, new_tokens, temperature=0.0)
    return prompt[0].tolist(), out[0, prompt_len:].tolist()


def _reload_matches(engine: Any, point: Path, eval_batches: SequenceBatches, rank: int,
                    batch_context: BatchContext | None = None) -> bool:
    """Reload the final checkpoint into the engine and check a held-out loss is unchanged, bit for bit."""
    batch = list(_held_out(eval_batches, 1))
    before = evaluate(engine, batch, batch_context)
    checkpoint.load(engine, point.parent, point.name, rank)
    after = evaluate(engine, batch, batch_context)
    return before == after or (math.isnan(before) and math.isnan(after))
