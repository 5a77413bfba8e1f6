"""`python train.py`, `deepspeed train.py` and `ava train`.

Resolves the configuration stack, then trains under DeepSpeed and writes the
run's outputs. `--dry_run` only validates the stack exactly as a run would
and prints the resolved configuration, the batch plan and the DeepSpeed JSON:
the guide's "validate before long runs" step.

A run writes checkpoints under `<output_dir>/checkpoints/`; `--resume`
continues the run in `--output_dir` from its latest complete checkpoint and
`--resume_from` starts a new output directory from any checkpoint. An output
directory that already holds files is otherwise never reused.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from ava.cli.args import add_stack_arguments, new_parser, resolve_stack
from ava.config import build_deepspeed_config
from ava.config.loader import ResolvedConfig
from ava.config.render import render_yaml
from ava.errors import UserError
from ava.secrets import redact, secret_values


def main(argv: Sequence[str], prog: str = "train.py") -> int:
    parser = new_parser(prog, "Train an Ava model under DeepSpeed.")
    add_stack_arguments(parser, require_config=True)
    parser.add_argument("--dry_run", action="store_true",
                        help="validate and print the resolved configuration and DeepSpeed JSON; do not train")
    parser.add_argument("--output_dir", default=None,
                        help="where the run writes its outputs (default: outputs/<config name>-<date_time>)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --output_dir from its latest complete checkpoint")
    parser.add_argument("--resume_from", default=None,
                        help="start from this checkpoint directory (e.g. RUN/checkpoints/step00001000)")
    parser.add_argument("--force_resume", action="store_true",
                        help="resume even though the batch configuration differs from the checkpoint's")
    parser.add_argument("--trust_checkpoint", action="store_true",
                        help="resume from a checkpoint even though its pickles reference objects beyond tensors and "
                        "DeepSpeed's optimizer state (they could run code while loading); only for checkpoints you "
                        "trust")
    parser.add_argument("--auto_resume", action="store_true",
                        help="resume from --output_dir's latest complete checkpoint if it has one, else start a "
                             "new run there (for jobs a scheduler may requeue)")
    from ava.train.preemption import PreemptionFlag

    # First thing: a scheduler's stop signal during start-up must not kill the process outright.
    with PreemptionFlag() as preemption:
        return _main(parser, argv, preemption)


def _main(parser: Any, argv: Sequence[str], preemption: Any) -> int:
    ns, extras = parser.parse_known_args(argv)
    resolved = resolve_stack(ns, extras)
    main_rank = os.environ.get("RANK", "0") == "0"
    if ns.dry_run:
        from ava.train.init_from import pretrained_for_run

        resolved, pretrained = pretrained_for_run(resolved, None)
        if main_rank:
            _print_plan(resolved, pretrained)
        return 0
    return _train(resolved, ns, Path(ns.config or "run").stem, main_rank, preemption)


def _print_plan(resolved: ResolvedConfig, pretrained: Any = None) -> None:
    cfg, b = resolved.config, resolved.batch
    print("# resolved configuration (each value with its origin)")
    sys.stdout.write(render_yaml(resolved, with_origins=True))
    print("\n# DeepSpeed config generated from it")
    print(json.dumps(build_deepspeed_config(cfg), indent=2))
    tokens = b.tokens_per_step(cfg.data.max_length)
    print(f"\nconfig OK: micro batch {b.micro} x accumulation {b.accumulation} x {b.world.size} rank(s) "
          f"= {b.global_batch} sequences = {tokens:,} tokens per optimizer step "
          f"[{b.world.source}]; precision {cfg.training.mixed_precision}; ZeRO stage {cfg.deepspeed.zero_stage}")
    from ava.model.summary import summarise_config

    m = summarise_config(cfg.model, cfg.data.max_length)
    print(f"model: {m.total:,} parameters ({m.active_per_token:,} active per token), "
          f"{m.training_flops_per_token / 1e6:,.1f} MFLOP per training token (`ava model summary` for details)")
    if pretrained is not None:
        print(f"init_from: weights and architecture from {pretrained.describe()}")
    import torch

    from ava.model import AvaForCausalLM
    from ava.model.lora import prepare_trainable

    with torch.device("meta"):  # shapes only: a dry run of a large model allocates nothing
        _, report, warnings = prepare_trainable(AvaForCausalLM(cfg.model), cfg.training.lora,
                                                from_scratch=cfg.training.init_from is None)
    print(report.line())
    for warning in warnings:
        print(f"WARNING: {warning}")


def _auto_resume(ns: Any) -> bool:
    """--auto_resume: resume when --output_dir holds a complete checkpoint; True when it starts fresh there."""
    if not ns.auto_resume:
        return False
    from ava.train.checkpoint import latest_complete

    if ns.output_dir is None or ns.resume or ns.resume_from:
        raise UserError("--auto_resume needs --output_dir and replaces --resume/--resume_from",
                              "pass --output_dir RUN_DIR --auto_resume, e.g. outputs/$SLURM_JOB_NAME-$SLURM_JOB_ID")
    ns.resume = latest_complete(Path(ns.output_dir) / "checkpoints") is not None
    return not ns.resume


def output_dir_for(requested: str | None, run_name: str, resume: bool, allow_existing: bool = False) -> Path:
    """The run's output directory: refused when it already holds files, unless resuming (then it must exist)."""
    if resume:
        if requested is None or not Path(requested).is_dir():
            raise UserError(f"--resume needs the --output_dir of the run to continue (got {requested})",
                                  "pass --output_dir RUN_DIR, the directory the interrupted run wrote")
        return Path(requested)
    # The default (outputs/<run_name>) is checked too: a fixed training.run_name names the same directory twice.
    path = Path(requested) if requested is not None else Path("outputs") / run_name
    if path.exists() and any(path.iterdir()) and not allow_existing:
        raise UserError(f"the output directory {path} already holds files; Ava never overwrites a run",
                              "choose a new --output_dir (or training.run_name), or add --resume (with "
                              "--output_dir) to continue the run in it")
    return path


BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def _resume_point(ns: Any, out_dir: Path, ds_config: dict, ranks: int) -> Path | None:
    """The checkpoint directory to resume from, after refusing a changed batch configuration."""
    from ava.train import checkpoint

    if ns.resume_from:
        point = Path(ns.resume_from)
        if not (point / checkpoint.COMPLETE).is_file():
            raise UserError(f"--resume_from {point} is not a complete Ava checkpoint (no {checkpoint.COMPLETE})",
                                  "point at a checkpoints/stepNNNNNNNN directory written to the end")
        previous_ds = point.parent.parent / "deepspeed.json"
    elif ns.resume:
        tag = checkpoint.latest_complete(out_dir / "checkpoints")
        if tag is None:
            raise UserError(f"{out_dir / 'checkpoints'} holds no complete checkpoint to resume from",
                                  "start a new run with a new --output_dir")
        point, previous_ds = out_dir / "checkpoints" / tag, out_dir / "deepspeed.json"
    else:
        return None
    if previous_ds.is_file() and not ns.force_resume:
        before = json.loads(previous_ds.read_text())
        changed = [f"{k}: {before.get(k)} -> {ds_config.get(k)}" for k in BATCH_KEYS if before.get(k) != ds_config.get(k)]
        if changed:
            raise UserError("the batch configuration differs from the checkpoint's (" + "; ".join(changed)
                                  + "), so the resumed run would not continue the same training",
                                  "resume with the original batch settings and number of ranks, or pass --force_resume")
    missing = [f"ava_state_rank{r}.pt" for r in range(ranks) if not (point / f"ava_state_rank{r}.pt").is_file()]
    if missing:
        written = len(list(point.glob("ava_state_rank*.pt")))
        raise UserError(
            f"{point} lacks {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}: it holds the state of "
            f"{written} rank(s), and this run has {ranks}",
            "resume with the number of ranks the checkpoint was written with; if it had that many, the checkpoint "
            "is damaged: start again from an earlier one (--resume_from CHECKPOINT --output_dir NEW_DIR)")
    from ava.train.checkpoint_trust import check_checkpoint

    check_checkpoint(point, trusted=ns.trust_checkpoint)
    for rank in range(ranks):  # small files, read safely: a damaged one is found before anything is written
        checkpoint.read_state(point / f"ava_state_rank{rank}.pt")
    return point


def _refuse_other_model(point: Path, model: Any) -> None:
    """Refuse to resume `point` with a model whose weights have other shapes: DeepSpeed would print pages of them.

    Judged on the parameter shapes of both models built on the meta device, so
    settings that change no weight (rope_theta, activation, top-k...) resume.
    """
    import torch

    from ava.config.pretrained import SHAPE_KEYS
    from ava.model import AvaForCausalLM
    from ava.train.export import run_model_config

    run_dir = point.parent.parent
    if not (run_dir / "config.yaml").is_file():
        return  # a checkpoint without its run directory: DeepSpeed's own check is all there is
    saved = run_model_config(run_dir)
    if saved == model:
        return
    with torch.device("meta"):
        before = {k: tuple(v.shape) for k, v in AvaForCausalLM(saved).state_dict().items()}
        now = {k: tuple(v.shape) for k, v in AvaForCausalLM(model).state_dict().items()}
    if before == now:
        return
    changed = [f"model.{k}: {getattr(saved, k)!r} in the checkpoint, {getattr(model, k)!r} now" for k in SHAPE_KEYS
               if getattr(saved, k) != getattr(model, k)]
    tensors = [f"{k} {before.get(k)} -> {now.get(k)}" for k in sorted(set(before) | set(now))
               if before.get(k) != now.get(k)]
    raise UserError(
        f"checkpoint {point} was written by a model of another shape (" + "; ".join(changed) + "), so its "
        f"weights cannot be loaded into this one ({len(tensors)} tensor(s) differ, e.g. {tensors[0]})",
        f"resume with the model settings recorded in {run_dir / 'config.yaml'}, or start a new run in a new "
        "--output_dir")

def _train(resolved: ResolvedConfig, ns: Any, config_name: str, main_rank: bool, preemption: Any) -> int:
    from ava.train.preemption import REQUEUE_EXIT_CODE

    started = time.perf_counter()
    cfg = resolved.config
    from ava.data.setup import build_training_data
    from ava.train.distributed import init_distributed
    from ava.train.loop import train

    run_name = cfg.training.run_name or f"{config_name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    fresh_in_place = _auto_resume(ns)
    out_dir = output_dir_for(ns.output_dir, run_name, ns.resume, allow_existing=fresh_in_place)  # refuse early
    faults = _fault_plan()
    ds_config = build_deepspeed_config(cfg)
    resume_from = _resume_point(ns, out_dir, ds_config, resolved.batch.world.size)
    from ava.train.init_from import pretrained_for_run

    resolved, pretrained = pretrained_for_run(resolved, resume_from.parent.parent if resume_from else None)
    cfg = resolved.config
    if resume_from is not None:
        _refuse_other_model(resume_from, cfg.model)
    process = init_distributed()
    if process.world_size > 1:
        from ava.train.rendezvous import discover

        print(f"ava: {discover(os.environ).describe()}", flush=True)
    out_dir = same_on_every_rank(out_dir)  # a date-stamped default can differ by a second between ranks
    if process.world_size != resolved.batch.world.size:
        raise UserError(
            f"the launcher started {process.world_size} process(es) but the batch was planned for "
            f"{resolved.batch.world.size} ({resolved.batch.world.source})",
            "pass the same --num_gpus/--num_nodes to the launcher and to train.py, or set WORLD_SIZE")
    from ava.train.lost_rank import Peers, is_lost_peer, lost_rank_error

    peers = Peers.gather() if process.world_size > 1 else None  # so that a rank that dies can be named
    b = resolved.batch
    steps_hint = cfg.training.max_steps or 1000
    data = build_training_data(cfg.data, cfg.model.vocab_size, b.micro, cfg.data.eval_batch_size, process.rank,
                               process.world_size, needed_sequences=steps_hint * b.global_batch,
                               max_steps=cfg.training.max_steps)
    if data.eval is None and cfg.training.save_strategy == "best":
        raise UserError(
            "training.save_strategy is 'best', but there is no held-out data to evaluate on (fewer held-out "
            f"sequences than data.eval_batch_size {cfg.data.eval_batch_size} x {process.world_size} rank(s)), "
            "so the run would never save a checkpoint",
            "provide more validation data (val.bin), lower data.eval_batch_size, or use save_strategy: steps")
    from ava.train.console import RunConsole
    from ava.train.loop import total_steps
    from ava.train.run_info import peak_memory, write_versions

    planned = total_steps(cfg, data.train.batches_per_epoch, b.accumulation)
    start_step = int(resume_from.name.removeprefix("step")) if resume_from is not None else 0
    console = RunConsole(planned, enabled=main_rank, start_step=start_step)
    metrics, wandb = None, None
    if main_rank:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(render_yaml(resolved, with_origins=True))
        (out_dir / "deepspeed.json").write_text(json.dumps(ds_config, indent=2) + "\n")
        write_versions(out_dir / "versions.json")
        if resume_from is not None and ns.resume:
            _drop_records_after(out_dir / "metrics.jsonl", start_step)
        metrics = (out_dir / "metrics.jsonl").open("a")
        if resume_from is not None:
            console.note(f"resuming from {resume_from}")
        console.note(f"data: {data.description}")
        for warning in data.warnings:
            console.warn(warning)
        console.note(f"batch: {b.micro} x {b.accumulation} x {b.world.size} rank(s) = {b.global_batch} sequences "
                     f"= {b.tokens_per_step(cfg.data.max_length):,} tokens per step; precision "
                     f"{cfg.training.mixed_precision}; ZeRO stage {cfg.deepspeed.zero_stage}")
        if pretrained is not None:
            console.note(f"init_from: {pretrained.describe()}"
                         + (" (the resumed checkpoint replaces these weights)" if resume_from is not None else ""))
        console.note(f"outputs: {out_dir}")
        if cfg.training.gradient_health.enabled:
            console.note(_health_plan(cfg))
        if cfg.training.wandb_log:
            from ava.train.wandb_log import WandbLogger

            wandb = WandbLogger.start(resolved.to_dict(), cfg.training.wandb_project, cfg.training.wandb_entity,
                                      out_dir.name, out_dir)

    from ava.train.expert_usage import OverflowWatch

    overflow = OverflowWatch(cfg.model.expert_capacity_factor) if cfg.model.is_moe else None

    def on_log(record: dict) -> None:
        if metrics is None:
            return
        if "loss" in record:
            record.update(peak_memory())
        try:
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
        except OSError as error:  # a full disk: stop with the checkpoints written so far, not a traceback
            raise UserError(f"could not append to {out_dir / 'metrics.jsonl'}: {error.strerror}",
                                  f"free space on {out_dir}, then {_resume_hint(out_dir)}") from None
        console.log(record)
        if overflow is not None and (message := overflow.check(record)) is not None:
            console.warn(message)
        if wandb is not None:
            wandb.log(record)

    from ava.hf.pretrained import load_weights

    # Loaded inside the loop and dropped once copied into the model: no second full copy lives through training.
    initial_weights = (lambda: load_weights(pretrained)) if pretrained is not None and resume_from is None else None
    retrieval = _retrieval_plan(cfg, data, pretrained)
    try:
        with console:
            result = train(cfg, ds_config, process, data.train, data.eval, on_log,
                           checkpoint_dir=out_dir / "checkpoints", resume_from=resume_from,
                           faults=faults, on_note=console.note, preemption=preemption,
                           initial_weights=initial_weights, on_warning=console.warn, retrieval=retrieval)
    except BaseException as exc:
        failure = (lost_rank_error(exc, peers, process.rank, _resume_hint(out_dir))
                   if peers is not None and is_lost_peer(exc) else exc)
        if main_rank:
            _record_failure(out_dir, failure, started, wandb)
        if failure is not exc:
            raise failure from None
        raise
    finally:
        if metrics is not None:
            try:
                metrics.close()
            except OSError as error:  # the disk filled up: what the run logged so far is on disk already
                print(f"ava: could not close {out_dir / 'metrics.jsonl'} ({error.strerror})", file=sys.stderr)
        _shutdown()
    if result.status == "preempted":
        if main_rank:
            _write_preempted(out_dir, result, started, wandb)
        return REQUEUE_EXIT_CODE
    if not main_rank:
        return 0
    from ava.train.plots import write_plots

    frozen_base = None
    if cfg.training.lora.enabled and pretrained is not None:  # export merges onto the fp32 pretrained base
        frozen_base = load_weights(pretrained)
    summary = _summary(result, data, out_dir, started, cfg, frozen_base)
    usage = _add_diagnosis(summary, out_dir / "metrics.jsonl", cfg)
    write_plots(out_dir / "metrics.jsonl", out_dir / "plots")
    (out_dir / "summary.json").write_text(json.dumps(redact(summary, secret_values()), indent=2) + "\n")
    if wandb is not None:
        wandb.finish(summary)
    console.final_table(summary)
    if summary["sample"] is not None and "continuation" in summary["sample"]:
        console.note(f"sample (greedy, from a held-out prompt): {summary['sample']['prompt']!r} -> "
                     f"{summary['sample']['continuation']!r}")
    _print_checks(summary)
    _print_diagnosis(summary, usage, console)
    return 0 if summary["checks_passed"] else 1


def _health_plan(cfg: Any) -> str:
    """One line saying what the gradient-health monitor will do."""
    h = cfg.training.gradient_health
    plan = (f"gradient health: clip {h.initial_clip_value:g} -> {h.final_clip_value:g} over {h.warmup_steps} steps; "
            f"a norm above {h.explosion_threshold:g}x the {h.baseline} baseline (armed after "
            f"{h.baseline_warmup_steps} healthy steps) or NaN/Inf skips the update")
    if h.auto_reduce_lr:
        plan += f"; explosions scale the LR by {h.lr_reduction_factor:g} for {h.lr_cooldown_steps} steps"
    if h.max_consecutive_bad_steps:
        plan += f"; {h.max_consecutive_bad_steps} bad steps in a row roll back to the last checkpoint"
    return plan


def _fault_plan() -> Any:
    """Injected faults for tests (AVA_INJECT_FAULTS); a malformed value is a user error."""
    from ava.train.faults import FaultPlan, FaultSpecError

    try:
        plan = FaultPlan.from_env(os.environ)
    except FaultSpecError as exc:
        raise UserError(str(exc), "fix or unset AVA_INJECT_FAULTS") from None
    if plan is not None and os.environ.get("RANK", "0") == "0":
        print(f"warning: AVA_INJECT_FAULTS is set: injecting {os.environ['AVA_INJECT_FAULTS']} "
              "(a test hook; unset it for real training)", file=sys.stderr)
    return plan


def _write_preempted(out_dir: Path, result: Any, started: float, wandb: Any) -> None:
    """summary.json for a run stopped by a signal: where it stopped and how it continues."""
    summary = {"status": "preempted", "steps": result.steps, "planned_steps": result.planned_steps,
               "final_checkpoint": str(result.checkpoint) if result.checkpoint else None,
               "seconds": time.perf_counter() - started,
               "resume_hint": f"continue with --output_dir {out_dir} --resume (or --auto_resume)"}
    (out_dir / "summary.json").write_text(json.dumps(redact(summary, secret_values()), indent=2) + "\n")
    if wandb is not None:
        wandb.finish(summary)
    print(f"preempted at step {result.steps} of {result.planned_steps}: checkpoint {result.checkpoint} saved; "
          f"exit code 75 asks the scheduler to requeue; {summary['resume_hint']}", flush=True)


def _resume_hint(out_dir: Path) -> str:
    from ava.train.checkpoint import latest_complete

    tag = latest_complete(out_dir / "checkpoints")
    return (f"continue with --output_dir {out_dir} --resume (from checkpoints/{tag})" if tag
            else "start the run again: it had not written a complete checkpoint yet")


def _record_failure(out_dir: Path, exc: BaseException, started: float, wandb: Any) -> None:
    """Leave a summary.json that says the run failed and why; the checkpoints already written stay."""
    if not out_dir.is_dir():
        return
    status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
    summary = {"status": status, "error": f"{type(exc).__name__}: {exc}", "seconds": time.perf_counter() - started}
    summary["resume_hint"] = _resume_hint(out_dir)
    try:
        (out_dir / "summary.json").write_text(json.dumps(redact(summary, secret_values()), indent=2) + "\n")
    except OSError as error:  # a full disk is often why the run failed: the original error matters more
        print(f"ava: could not write {out_dir / 'summary.json'} ({error.strerror})", file=sys.stderr)
    if wandb is not None:
        wandb.finish(summary)


def _summary(result: Any, data: Any, out_dir: Path, started: float, cfg: Any,
             frozen_base: dict[str, Any] | None = None) -> dict[str, Any]:
    """summary.json: how the run ended, its losses, and the checks a smoke test relies on."""
    from ava.train.checkpoint import best_tag
    from ava.train.evaluation import perplexity
    from ava.train.export import export_checkpoint
    from ava.train.run_info import peak_memory

    evaluates = cfg.training.eval_strategy != "no"
    best = best_tag(out_dir / "checkpoints")
    # save_strategy best: the model a fine-tuning run hands over is its best one, not its last.
    exported = out_dir / "checkpoints" / best if best and cfg.training.save_strategy == "best" else result.checkpoint
    model_dir = None
    if exported is not None:
        model_dir = out_dir / "model"
        export_checkpoint(exported, result.model.config, model_dir, overwrite=True, lora_scaling=result.lora_scaling,
                          frozen_base=frozen_base)
    first, final = (result.losses[0], result.losses[-1]) if result.losses else (None, None)
    sample = None
    if result.sample is not None:
        prompt, generated = result.sample
        sample = {"prompt_ids": prompt, "continuation_ids": generated}
        tokenizer = getattr(data, "tokenizer", None)
        if tokenizer is not None:
            sample.update(prompt=tokenizer.decode(prompt), continuation=tokenizer.decode(generated))
    skipped_nonfinite = (result.health or {}).get("counts", {}).get("nonfinite_gradient", 0)
    checks = {
        "steps_completed": result.steps == result.planned_steps or result.status == "early_stopped",
        # A NaN loss the health monitor caught (its update skipped) is handled, not a failure.
        "loss_finite": not result.losses or math.isfinite(result.losses[-1])
        and sum(not math.isfinite(v) for v in result.losses) <= skipped_nonfinite,
        "evaluated": result.evaluations > 0 if evaluates and data.eval is not None else None,
        "checkpoint_saved": result.checkpoint is not None,
        "checkpoint_reloads_exactly": result.checkpoint_reload_ok,
        "model_exported": model_dir is not None and (model_dir / "model.safetensors").is_file(),
    }
    return {
        "status": result.status, "steps": result.steps, "planned_steps": result.planned_steps,
        **({"failure": result.failure} if result.failure else {}),
        "precision": result.precision.as_dict() if result.precision is not None else None,
        "gradient_health": result.health,
        "first_loss": first, "final_loss": final,
        "eval_loss": result.eval_loss,
        "eval_perplexity": perplexity(result.eval_loss) if result.eval_loss is not None else None,
        "best_eval_loss": result.best_eval_loss, "best_step": result.best_step,
        "best_checkpoint": str(out_dir / "checkpoints" / best) if best else None,
        "final_checkpoint": str(result.checkpoint) if result.checkpoint else None,
        "model_dir": str(model_dir) if model_dir else None,
        "exported_checkpoint": str(exported) if exported else None,
        "init_from": cfg.training.init_from,
        "parameters": result.parameters.as_dict() if result.parameters is not None else None,
        "warnings": [*data.warnings, *result.warnings],
        "tokens": result.tokens, "seconds": time.perf_counter() - started,
        "tokens_per_s": result.tokens / result.seconds if result.seconds else None, "output_dir": str(out_dir),
        "first_step_seconds": result.first_step_seconds,
        "entropy_rate": data.entropy_rate, "sample": sample,
        **peak_memory(),
        "checks": checks, "checks_passed": all(v is not False for v in checks.values()),
    }


def _add_diagnosis(summary: dict[str, Any], metrics_path: Path, cfg: Any) -> Any:
    """The train/validation fit verdict and, for MoE, the expert-utilisation report, from the whole metrics history.

    Read from metrics.jsonl rather than this process's records so that a
    resumed run is judged on its full history.
    """
    from ava.train.expert_usage import expert_usage
    from ava.train.fit_verdict import diagnose_fit
    from ava.train.plots import read_metrics

    records = read_metrics(metrics_path)
    summary["fit"] = diagnose_fit(records).as_dict() if cfg.training.eval_strategy != "no" else None
    usage = expert_usage(records, cfg.model.expert_capacity_factor) if cfg.model.is_moe else None
    summary["experts"] = usage.as_dict() if usage is not None else None
    if usage is not None:
        summary["warnings"] = summary["warnings"] + list(usage.warnings)
    return usage


def _print_diagnosis(summary: dict[str, Any], usage: Any, console: Any) -> None:
    """The verdict line, the expert table and every warning again, last, where the user looks."""
    from ava.train.fit_verdict import FitVerdict

    if summary.get("fit"):
        console.note(FitVerdict(**summary["fit"]).line())
    if usage is not None:
        console.expert_table(usage)
    for warning in summary["warnings"]:
        console.warn(warning)


def _print_checks(summary: dict[str, Any]) -> None:
    labels = {"steps_completed": "all planned steps ran",
              "loss_finite": "every loss finite (or its update skipped by the gradient-health monitor)",
              "evaluated": "held-out evaluation ran", "checkpoint_saved": "checkpoint saved",
              "checkpoint_reloads_exactly": "checkpoint reloads to the same loss",
              "model_exported": "consolidated weights exported (model/)"}
    print("run checks:")
    for key, ok in summary["checks"].items():
        mark = "skip" if ok is None else ("PASS" if ok else "FAIL")
        print(f"  {mark:<4}  {labels[key]}")
    memory = ", ".join(f"{k.removeprefix('memory/')} {v:.2f} GB" for k, v in summary.items()
                       if k.startswith("memory/"))
    losses = (f"loss {summary['first_loss']:.4f} -> {summary['final_loss']:.4f}"
              if summary["first_loss"] is not None else "no steps run")
    print(f"{'PASSED' if summary['checks_passed'] else 'FAILED'}: {summary['status']}, {summary['steps']} steps, "
          f"{losses}, best eval loss {_number(summary['best_eval_loss'])}, {summary['seconds']:.1f} s "
          f"({summary['first_step_seconds']:.1f} s to the first step), memory {memory or 'n/a'}")
    if summary.get("failure"):
        print(f"run failed: {summary['failure']}")


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def same_on_every_rank(path: Path) -> Path:
    """Rank 0's `path` on every rank (a date-stamped default name can differ by a second between ranks)."""
    import torch.distributed as dist

    if dist.get_world_size() == 1:
        return path
    chosen = [str(path)]
    dist.broadcast_object_list(chosen, src=0)
    return Path(chosen[0])


def _drop_records_after(path: Path, step: int) -> None:
    """Forget metrics the interrupted run logged after its last checkpoint: the resumed run logs them again."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(path)


def _shutdown() -> None:
    """Leave the process group cleanly: without it gloo's threads can abort the process at exit."""
    from ava.train.distributed import leave_process_group

    leave_process_group()


def _retrieval_plan(cfg: Any, data: Any, pretrained: Any) -> Any:
    """What the batches read besides their tokens (retrieval, episodic memory's documents); None: nothing."""
    if not (cfg.model.use_rag or cfg.model.use_episodic_memory):
        return None
    from ava.hf.pretrained import load_weights
    from ava.rag.run_store import training_rows
    from ava.train.retrieval import RetrievalPlan

    tokenizer = data.tokenizer
    return RetrievalPlan(
        cfg.model, training_rows(data) if cfg.model.use_rag else None,
        tokenizer.eos_id if tokenizer is not None else cfg.data.eos_token_id, cfg.data.cache_dir,
        decode=tokenizer.decode if tokenizer is not None else None,
        pretrained_embedding=(lambda: load_weights(pretrained)["embed_tokens.weight"]) if pretrained else None)
