"""A whole training run, as a Python call: `run(resolved_config, output_dir=...)` -> `RunOutcome`.

What `train.py` does, without the command line, so a notebook or a sweep
script trains exactly as the CLI does:

    from ava.config import ConfigFiles, load_config
    from ava.train import run

    resolved = load_config(ConfigFiles("configs/gpu/tiny.yaml", "configs/hardware/cpu.yaml"), ["--max_steps", "50"])
    outcome = run(resolved, output_dir="outputs/sweep-lr3e-4", callbacks=[MyCallback()])
    print(outcome.status, outcome.summary["eval_loss"])

The run owns its output directory: it refuses one that holds another run,
finds the checkpoint to resume from (and refuses a resume that would not
continue the same training), writes the header files, sends every record to
metrics.jsonl, the console, W&B and TensorBoard (all callbacks), trains
(`ava.train.pretraining.train`), and ends with summary.json, the exported
model, plots and the end-of-run report. User mistakes raise `ava.errors.UserError`.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from ava.config import build_deepspeed_config
from ava.config.loader import ResolvedConfig
from ava.config.render import render_yaml
from ava.errors import UserError
from ava.model.memory_fit import check_run_memory
from ava.train import run_dir
from ava.train.runtime.preemption import INTERRUPT_EXIT_CODE, REQUEUE_EXIT_CODE, PreemptionFlag
from ava.train.trainer.callback import Callback
from ava.train.trainer.trainer import TrainResult


@dataclass
class RunOutcome:
    """What a run produced: how it ended, where its outputs are, and (on rank 0) its summary.json."""

    status: str  # "completed", "early_stopped", "preempted", "interrupted" (Ctrl-C) or "failed"
    output_dir: Path
    result: TrainResult
    summary: dict[str, Any] | None = None  # summary.json's content; None on the other ranks

    @property
    def checks_passed(self) -> bool:
        """The run's own checks (steps ran, losses finite, checkpoint reloads, model exported) all passed."""
        return bool(self.summary and self.summary["checks_passed"])

    @property
    def exit_code(self) -> int:
        """The process exit status a command should end with: 75 asks a scheduler to requeue a preempted run."""
        if self.status == "preempted":
            return REQUEUE_EXIT_CODE
        if self.status == "interrupted":
            return INTERRUPT_EXIT_CODE
        if self.summary is None:  # not rank 0: rank 0 reports
            return 0
        return 0 if self.checks_passed else 1


def run(resolved: ResolvedConfig, *, output_dir: str | Path | None = None, resume: bool = False,
        resume_from: str | Path | None = None, auto_resume: bool = False, force_resume: bool = False,
        trust_checkpoint: bool = False, callbacks: Iterable[Callback] = (),
        preemption: PreemptionFlag | None = None) -> RunOutcome:
    """Train the model `resolved` describes and write the run's outputs; see the module docstring.

    `output_dir` defaults to outputs/<config name>-<date_time> (or
    training.run_name). `resume` continues the run in `output_dir` from its
    latest complete checkpoint, `resume_from` starts a new directory from a
    checkpoint, `auto_resume` does the first when there is a checkpoint (for
    requeued jobs). `force_resume` allows another batch configuration;
    `trust_checkpoint` loads a checkpoint whose pickles hold more than
    tensors. `callbacks` see every record and may keep state in checkpoints.
    A stop signal (SIGTERM, SIGUSR1) checkpoints and ends the run with status
    "preempted", a Ctrl-C likewise with status "interrupted" (a second one
    raises KeyboardInterrupt); `preemption` is the flag to read (by default one
    is installed for the duration of the run).
    """
    if preemption is None:
        with PreemptionFlag() as flag:
            return run(resolved, output_dir=output_dir, resume=resume, resume_from=resume_from,
                       auto_resume=auto_resume, force_resume=force_resume, trust_checkpoint=trust_checkpoint,
                       callbacks=callbacks, preemption=flag)
    from ava.data.model_tokens import tokens_for_data
    from ava.data.setup import build_training_data
    from ava.train.checkpoint.resume import auto_resume as has_checkpoint
    from ava.train.checkpoint.resume import check_resume, elastic_batch, locate, refuse_other_model
    from ava.train.inputs.init_from import pretrained_for_run
    from ava.train.pretraining import total_steps
    from ava.train.report.console import RunConsole
    from ava.train.runtime.distributed import RankWatch, init_distributed
    from ava.train.runtime.faults import plan_for_run

    started = time.perf_counter()
    cfg = resolved.config
    main_rank = os.environ.get("RANK", "0") == "0"
    config_name = Path(resolved.files.config or "run").stem
    run_name = cfg.training.run_name or f"{config_name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    fresh_in_place = False
    if auto_resume:
        resume = has_checkpoint(output_dir, resume, resume_from)
        fresh_in_place = not resume
    out_dir = run_dir.output_dir_for(output_dir, run_name, resume, allow_existing=fresh_in_place)  # refuse early
    faults = plan_for_run(os.environ)
    if cfg.training.tensorboard_dir is not None:
        from ava.train.callbacks.tensorboard import require_tensorboard

        require_tensorboard()  # on every rank, before any work: a missing package is the user's to fix
    point = locate(out_dir, resume=resume, resume_from=resume_from)
    elastic_note = None
    if point is not None:  # on another number of ranks: the checkpoint's global batch, accumulation re-derived
        resolved, elastic_note = elastic_batch(resolved, point)
        cfg = resolved.config
    ds_config = build_deepspeed_config(cfg)
    from ava.train.engine.build import refuse_unsupported_fp16

    refuse_unsupported_fp16(ds_config)  # before the run directory is written: the machine's own answer
    if point is not None:
        check_resume(point, ds_config, resolved.batch.world.size, force=force_resume, trusted=trust_checkpoint)
    resolved, pretrained = pretrained_for_run(resolved, point.parent.parent if point else None)
    cfg = resolved.config
    if point is not None:
        refuse_other_model(point, cfg.model)
    if cfg.data.sampling == "random_windows" and cfg.model.use_rag:
        raise UserError("data.sampling: random_windows with model.use_rag: the retrieval store is built from the "
                        "packed training rows, and a window cut at any offset matches none of them, so its own "
                        "document could not be kept out of its neighbours",
                        "use data.sampling: packed with retrieval, or set model.use_rag: false")
    process = init_distributed()
    if process.world_size > 1:
        from ava.train.runtime.rendezvous import discover

        print(f"ava: {discover(os.environ).describe()}", flush=True)
    out_dir = run_dir.same_on_every_rank(out_dir)  # a date-stamped default can differ by a second between ranks
    if process.world_size != resolved.batch.world.size:
        raise UserError(
            f"the launcher started {process.world_size} process(es) but the batch was planned for "
            f"{resolved.batch.world.size} ({resolved.batch.world.source})",
            "pass the same --num_gpus/--num_nodes to the launcher and to train.py, or set WORLD_SIZE")
    # An error on one rank (or a rank that dies) ends every rank, each saying which rank and why.
    watch = RankWatch.start(process, lambda: run_dir.resume_hint(out_dir))
    try:  # the data and the header: an error one rank meets here ends the others too
        b = resolved.batch
        # needed_sequences is only a stream's nominal epoch: no data, held-out set or batch order depends on max_steps,
        # so a resume with another max_steps continues the same data (ava.data.setup).
        data = build_training_data(cfg.data, cfg.model.vocab_size, b.micro, cfg.data.eval_batch_size, process.rank,
                                   process.world_size, needed_sequences=(cfg.training.max_steps or 1000) * b.global_batch,
                                   max_steps=cfg.training.max_steps, accumulation=b.accumulation)
        if data.eval is None and cfg.training.save_strategy == "best":
            raise UserError(
                "training.save_strategy is 'best', but there is no held-out data to evaluate on (fewer held-out "
                f"sequences than data.eval_batch_size {cfg.data.eval_batch_size} x {process.world_size} rank(s)), "
                "so the run would never save a checkpoint",
                "provide more validation data (val.bin), lower data.eval_batch_size, or use save_strategy: steps")
        planned = total_steps(cfg.training, data.train.batches_per_epoch, b.accumulation)
        start_step = int(point.name.removeprefix("step")) if point is not None else 0
        console = RunConsole(planned, enabled=main_rank, start_step=start_step)
        metrics, wandb, sinks = None, None, []
        if main_rank:
            run_dir.write_header(out_dir, render_yaml(resolved, with_origins=True), ds_config)
            run_dir.write_tokens(out_dir, tokens_for_data(cfg.data, data.tokenizer))
            if point is not None and resume:
                run_dir.drop_records_after(out_dir / "metrics.jsonl", start_step)
            metrics = (out_dir / "metrics.jsonl").open("a")
            _print_header(console, resolved, data, point, pretrained, out_dir)
            if elastic_note is not None:
                console.note(elastic_note)
            wandb = _start_wandb(resolved, out_dir)
            sinks = _sinks(cfg, console, metrics, out_dir, wandb, start_step if resume else 0)
    except BaseException as exc:
        failure = watch.account(exc)
        watch.leave()
        if failure is not exc:
            raise failure from None
        raise
    from ava.hf.pretrained import load_weights

    # Loaded inside the loop and dropped once copied into the model: no second full copy lives through training.
    initial_weights = (lambda: load_weights(pretrained)) if pretrained is not None and point is None else None
    from ava.train.pretraining import train

    try:
        with console:
            result = train(cfg, ds_config, process, data.train, data.eval, callbacks=[*callbacks, *sinks],
                           checkpoint_dir=out_dir / "checkpoints", resume_from=point, preemption=preemption,
                           faults=faults, initial_weights=initial_weights, retrieval=_retrieval_plan(cfg, data, pretrained),
                           reporter=console,
                           eos_id=data.tokenizer.eos_id if data.tokenizer is not None else cfg.data.eos_token_id)
    except BaseException as exc:
        failure = watch.account(exc)
        if main_rank:
            run_dir.record_failure(out_dir, failure, started, wandb)
        if failure is not exc:
            raise failure from None
        raise
    finally:
        for sink in sinks:  # TensorBoard's writer stays open through on_train_end for the callbacks after it
            if hasattr(sink, "close"):
                sink.close()
        if metrics is not None:
            try:
                metrics.close()
            except OSError as error:  # the disk filled up: what the run logged so far is on disk already
                print(f"ava: could not close {out_dir / 'metrics.jsonl'} ({error.strerror})", file=sys.stderr)
        watch.leave()  # leaves the process group: without it gloo's threads can abort the process at exit
    if result.status == "preempted":  # by a signal: the flag says whether a scheduler's or a person's
        summary = run_dir.record_preempted(out_dir, result, started, wandb, preemption.status) if main_rank else None
        return RunOutcome(preemption.status, out_dir, result, summary)
    if not main_rank:
        return RunOutcome(result.status, out_dir, result)
    return RunOutcome(result.status, out_dir, result, _report(result, data, out_dir, started, cfg, pretrained, console,
                                                             wandb))


def _report(result: TrainResult, data: Any, out_dir: Path, started: float, cfg: Any, pretrained: Any, console: Any,
            wandb: Any) -> dict[str, Any]:
    """Export the model, write summary.json and the plots, and print the end-of-run report (rank 0)."""
    from ava.hf.pretrained import load_weights
    from ava.train.report.plots import write_plots
    from ava.train.report.summary import add_diagnosis, build_summary, print_checks, print_diagnosis

    frozen_base = None
    if cfg.training.lora.enabled and pretrained is not None:  # export merges onto the fp32 pretrained base
        frozen_base = load_weights(pretrained)
    # The plots need only metrics.jsonl, complete now: drawn in a thread while the model is exported (mostly
    # file reading and writing, which releases the GIL), they add little to the end of a short run instead
    # of 1-2 s. A plotting error still reaches the caller, from `result()`.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ava-plots") as pool:
        plots = pool.submit(write_plots, out_dir / "metrics.jsonl", out_dir / "plots")
        summary = build_summary(result, data, out_dir, started, cfg, frozen_base)
        usage = add_diagnosis(summary, out_dir / "metrics.jsonl", cfg)
        plots.result()
    run_dir.write_summary(out_dir, summary)
    if wandb is not None:
        wandb.finish(summary)
    console.final_table(summary)
    if summary["sample"] is not None and "continuation" in summary["sample"]:
        console.note(f"sample (greedy, from a held-out prompt): {summary['sample']['prompt']!r} -> "
                     f"{summary['sample']['continuation']!r}")
    print_checks(summary)
    print_diagnosis(summary, usage, console)
    return summary


def _print_header(console: Any, resolved: ResolvedConfig, data: Any, point: Path | None, pretrained: Any,
                  out_dir: Path) -> None:
    """What the run is about to do, before the first step (rank 0)."""
    cfg, b = resolved.config, resolved.batch
    if point is not None:
        console.note(f"resuming from {point}")
    console.note(f"data: {data.description}")
    for warning in data.warnings:
        console.warn(warning)
    console.note(f"batch: {b.micro} x {b.accumulation} x {b.world.size} rank(s) = {b.global_batch} sequences "
                 f"= {b.tokens_per_step(cfg.data.max_length):,} tokens per step; precision "
                 f"{cfg.training.mixed_precision}; ZeRO stage {cfg.deepspeed.zero_stage}")
    memory = check_run_memory(cfg.model, cfg.training, cfg.deepspeed, cfg.data.max_length, b.world.size,
                              cfg.hardware.memory_gb, resolved.origin(("hardware", "memory_gb")).where())
    console.warn(memory.warning()) if memory.warning() else console.note(memory.line())
    if pretrained is not None:
        console.note(f"init_from: {pretrained.describe()}"
                     + (" (the resumed checkpoint replaces these weights)" if point is not None else ""))
    console.note(f"outputs: {out_dir}")
    if cfg.training.gradient_health.enabled:
        console.note(_health_plan(cfg.training.gradient_health))


def _start_wandb(resolved: ResolvedConfig, out_dir: Path) -> Any:
    t = resolved.config.training
    if not t.wandb_log:
        return None
    from ava.train.report.wandb_log import WandbLogger

    return WandbLogger.start(resolved.to_dict(), t.wandb_project, t.wandb_entity, out_dir.name, out_dir)


def _sinks(cfg: Any, console: Any, metrics: Any, out_dir: Path, wandb: Any, resumed_at: int) -> list[Callback]:
    """Where rank 0's records go: metrics.jsonl (first: it adds peak memory), the console, W&B, TensorBoard."""
    from ava.train.callbacks.console import Console
    from ava.train.callbacks.metrics_file import MetricsFile
    from ava.train.report.expert_usage import OverflowWatch

    overflow = OverflowWatch(cfg.model.expert_capacity_factor) if cfg.model.is_moe else None
    sinks: list[Callback] = [MetricsFile(metrics, out_dir / "metrics.jsonl", lambda: run_dir.resume_hint(out_dir)),
                             Console(console, overflow)]
    if wandb is not None:
        from ava.train.callbacks.weights_and_biases import Wandb

        sinks.append(Wandb(wandb))
    if cfg.training.tensorboard_dir is not None:
        from ava.train.callbacks.tensorboard import TensorBoard, log_dir

        tensorboard = TensorBoard.start(log_dir(cfg.training.tensorboard_dir, out_dir), resumed_at)
        if tensorboard is not None:
            sinks.append(tensorboard)
    return sinks


def _health_plan(h: Any) -> str:
    """One line saying what the gradient-health monitor will do."""
    plan = (f"gradient health: clip {h.initial_clip_value:g} -> {h.final_clip_value:g} over {h.warmup_steps} steps; "
            f"a norm above {h.explosion_threshold:g}x the {h.baseline} baseline (armed after "
            f"{h.baseline_warmup_steps} healthy steps) or NaN/Inf skips the update")
    if h.auto_reduce_lr:
        plan += f"; explosions scale the LR by {h.lr_reduction_factor:g} for {h.lr_cooldown_steps} steps"
    if h.max_consecutive_bad_steps:
        plan += f"; {h.max_consecutive_bad_steps} bad steps in a row roll back to the last checkpoint"
    return plan


def _retrieval_plan(cfg: Any, data: Any, pretrained: Any) -> Any:
    """What the batches read besides their tokens (retrieval, episodic memory's documents); None: nothing."""
    if not (cfg.model.use_rag or cfg.model.use_episodic_memory):
        return None
    from ava.hf.pretrained import load_weights
    from ava.rag.run_store import training_rows
    from ava.train.inputs.retrieval import RetrievalPlan

    tokenizer = data.tokenizer
    return RetrievalPlan(
        cfg.model, training_rows(data) if cfg.model.use_rag else None,
        tokenizer.eos_id if tokenizer is not None else cfg.data.eos_token_id, cfg.data.cache_dir,
        decode=tokenizer.decode if tokenizer is not None else None,
        pretrained_embedding=(lambda: load_weights(pretrained)["embed_tokens.weight"]) if pretrained else None)
