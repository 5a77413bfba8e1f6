"""An RLHF pipeline as a Python call: `run(resolved_config, output_dir=...)` -> `PipelineOutcome`.

What `train_rlhf.py` does, without the command line. The run directory holds
the resolved config, one `metrics.jsonl` for all stages (each record names
its stage), a directory per stage with its model, summary and (while it
runs) its checkpoints, and the pipeline's `summary.json`. `resume` continues
a pipeline in its output directory from the first stage that did not
complete, inside that stage when it left a checkpoint; a stop signal
checkpoints the running stage and ends the pipeline "preempted" (exit 75 for
a scheduler to requeue).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from ava.config.loader import ResolvedConfig
from ava.config.render import render_yaml
from ava.errors import UserError
from ava.train import run_dir
from ava.train.runtime.preemption import INTERRUPT_EXIT_CODE, REQUEUE_EXIT_CODE, PreemptionFlag


@dataclass
class PipelineOutcome:
    """How the pipeline ended, where its outputs are, and each stage's summary."""

    status: str  # "completed", "failed" or "preempted"
    output_dir: Path
    stages: list[dict[str, Any]] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        if self.status == "preempted":
            return REQUEUE_EXIT_CODE
        if self.status == "interrupted":  # a Ctrl-C: checkpointed like "preempted", but not for a requeue
            return INTERRUPT_EXIT_CODE
        return 0 if self.status == "completed" else 1


def run(resolved: ResolvedConfig, *, output_dir: str | Path | None = None, resume: bool = False,
        auto_resume: bool = False, trust_checkpoint: bool = False,
        preemption: PreemptionFlag | None = None) -> PipelineOutcome:
    """Run the RLHF stages `resolved.config.rlhf` lists; see the module docstring.

    `auto_resume` resumes when `output_dir` holds a pipeline already (for jobs
    a scheduler may requeue) and starts one there otherwise; `trust_checkpoint`
    resumes a stage from a checkpoint whose pickles hold more than tensors.
    """
    if preemption is None:
        with PreemptionFlag() as flag:
            return run(resolved, output_dir=output_dir, resume=resume, auto_resume=auto_resume,
                       trust_checkpoint=trust_checkpoint, preemption=flag)
    from ava.rlhf.console import RLHFConsole
    from ava.rlhf.pipeline import forget_unsaved_records, prepare_pipeline, run_pipeline
    from ava.train.runtime.distributed import RankWatch, init_distributed
    from ava.train.runtime.faults import plan_for_run
    from ava.train.runtime.run_info import peak_memory

    started = time.perf_counter()
    cfg = resolved.config
    assert cfg.rlhf is not None
    main_rank = os.environ.get("RANK", "0") == "0"
    if auto_resume:
        if output_dir is None or resume:
            raise UserError("--auto_resume needs --output_dir and replaces --resume",
                            "pass --output_dir RUN_DIR --auto_resume, e.g. outputs/$SLURM_JOB_NAME-$SLURM_JOB_ID")
        resume = (Path(output_dir) / "config.yaml").is_file()
    config_name = Path(resolved.files.config or "run").stem
    name = cfg.training.run_name or f"rlhf-{config_name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    out_dir = run_dir.output_dir_for(output_dir, name, resume, allow_existing=auto_resume)
    plan = prepare_pipeline(cfg)  # every path and the reward function, before any rank starts
    faults = plan_for_run(os.environ)
    process = init_distributed()
    # From here an error on one rank ends every rank, each saying which rank failed and why (RankWatch).
    watch = RankWatch.start(process, lambda: f"continue with --output_dir {out_dir} --resume")
    console = RLHFConsole({s: getattr(cfg.rlhf, s).steps for s in cfg.rlhf.stages}, enabled=main_rank)
    metrics = None
    try:
        out_dir = run_dir.same_on_every_rank(out_dir)
        if main_rank:
            from ava.config import build_deepspeed_config

            run_dir.write_header(out_dir, render_yaml(resolved, with_origins=True), build_deepspeed_config(cfg))
            if resume:
                forget_unsaved_records(out_dir / "metrics.jsonl", out_dir, list(cfg.rlhf.stages))
            metrics = (out_dir / "metrics.jsonl").open("a")
            console.note(f"RLHF pipeline: {' -> '.join(cfg.rlhf.stages)}; {process.world_size} rank(s); "
                         f"precision {cfg.training.mixed_precision}; outputs: {out_dir}")
            # The stages log to metrics.jsonl and the console only: a logger key must not look as if it worked.
            for key, on in (("training.wandb_log", cfg.training.wandb_log),
                            ("training.tensorboard_dir", cfg.training.tensorboard_dir is not None)):
                if on:
                    console.note(f"WARNING: {key} is not used by RLHF stages (they log to metrics.jsonl and the "
                                 "console); plot metrics.jsonl, or remove the key for RLHF runs")
        result = run_pipeline(plan, out_dir, process, _sink(metrics, out_dir, console), console.note, resume=resume,
                              preemption=preemption, trust_checkpoint=trust_checkpoint, faults=faults)
    except BaseException as exc:
        failure = watch.account(exc)
        if failure is not exc:
            raise failure from None
        raise
    finally:
        if metrics is not None:
            metrics.close()
        watch.leave()
    if result.status == "preempted":  # by a signal: the flag says whether a scheduler's or a Ctrl-C ("interrupted")
        result.status = preemption.status
    outcome = PipelineOutcome(result.status, out_dir, result.stages)
    if not main_rank:
        return outcome
    summary = {"status": result.status, "stages": result.stages, "seconds": time.perf_counter() - started,
               "output_dir": str(out_dir), **peak_memory()}
    if result.status in ("preempted", "interrupted"):
        summary["resume_hint"] = f"continue with --output_dir {out_dir} --resume (or --auto_resume)"
    run_dir.write_summary(out_dir, summary)
    console.final_table(result.stages)
    for line in reward_curve_lines(result.stages):
        console.note(line)
    memory = ", ".join(f"{k.removeprefix('memory/')} {v:.2f} GB" for k, v in summary.items() if k.startswith("memory/"))
    console.note(f"{result.status}: {len(result.stages)} stage(s) in {summary['seconds']:.0f} s; memory {memory}; "
                 f"outputs in {out_dir}" + (f"; {summary['resume_hint']}" if "resume_hint" in summary else ""))
    return outcome


def _sink(metrics: Any, out_dir: Path, console: Any) -> Callable[[dict], None]:
    """Where every record goes: metrics.jsonl (rank 0; a full disk is a user error, as in train.py) and the console."""
    from ava.train.callbacks.metrics_file import MetricsFile

    file = MetricsFile(metrics, out_dir / "metrics.jsonl",
                       lambda: f"continue with --output_dir {out_dir} --resume") if metrics is not None else None

    def log(record: dict) -> None:
        if file is not None:
            file.write(record)
        console.log(record)

    return log


def reward_curve_lines(stages: list[dict[str, Any]]) -> list[str]:
    """The reward curve in words: how each RL stage moved the reward, from its first to its last steps."""
    lines = []
    for s in stages:
        summary = s.get("summary", {})
        if "reward_first_10pct" in summary:
            lines.append(f"{s['stage']}: mean rollout reward {summary['reward_first_10pct']:.3f} (first 10% of steps) "
                         f"-> {summary['reward_last_10pct']:.3f} (last 10%); held-out greedy reward "
                         f"{summary.get('before/eval_reward', float('nan')):.3f} -> "
                         f"{summary.get('after/eval_reward', float('nan')):.3f}")
    return lines
