"""`python train_rlhf.py` and `ava rlhf`: run an RLHF pipeline (SFT, reward model, DPO, PPO, GRPO).

The config stack is the training one plus `--rlhf_config`; the run directory
holds the resolved config, one `metrics.jsonl` for all stages (each record
names its stage), a directory per stage with its model and summary, and the
pipeline's `summary.json`. `--resume` continues a pipeline in its output
directory from the first stage that did not complete.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from ava.cli.args import add_stack_arguments, new_parser, resolve_stack
from ava.config import build_deepspeed_config
from ava.config.render import render_yaml
from ava.errors import UserError
from ava.secrets import redact, secret_values
from ava.train.run_dir import output_dir_for, same_on_every_rank


def main(argv: Sequence[str], prog: str = "train_rlhf.py") -> int:
    parser = new_parser(prog, "RLHF fine-tuning on the Ava engine: SFT, reward model, DPO, PPO and GRPO.")
    add_stack_arguments(parser, require_config=True)
    parser.add_argument("--dry_run", action="store_true", help="validate and print the resolved configuration only")
    parser.add_argument("--output_dir", default=None,
                        help="where the pipeline writes (default: outputs/rlhf-<config name>-<date_time>)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the pipeline in --output_dir from the first stage that did not complete")
    ns, extras = parser.parse_known_args(argv)
    if ns.rlhf_config is None:
        raise UserError("--rlhf_config is required: it says which RLHF stages to run",
                              "add --rlhf_config configs/rlhf/test_cpu.yaml (or your own)")
    resolved = resolve_stack(ns, extras)
    main_rank = os.environ.get("RANK", "0") == "0"
    if ns.dry_run:
        if main_rank:
            sys.stdout.write(render_yaml(resolved, with_origins=True))
            print(f"\nconfig OK: RLHF stages {', '.join(resolved.config.rlhf.stages)}")  # type: ignore[union-attr]
        return 0
    return _run(resolved, ns, Path(ns.config or "run").stem, main_rank)


def _run(resolved: Any, ns: Any, config_name: str, main_rank: bool) -> int:
    from ava.rlhf.console import RLHFConsole
    from ava.rlhf.pipeline import prepare_pipeline, run_pipeline
    from ava.train.runtime.distributed import init_distributed, leave_process_group
    from ava.train.runtime.run_info import peak_memory, write_versions

    started = time.perf_counter()
    cfg = resolved.config
    name = cfg.training.run_name or f"rlhf-{config_name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    out_dir = output_dir_for(ns.output_dir, name, ns.resume)
    plan = prepare_pipeline(cfg)  # every path and the reward function, before any rank starts
    process = init_distributed()
    out_dir = same_on_every_rank(out_dir)
    planned = {s: getattr(cfg.rlhf, s).steps for s in cfg.rlhf.stages}
    console = RLHFConsole(planned, enabled=main_rank)
    metrics = None
    if main_rank:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(render_yaml(resolved, with_origins=True))
        (out_dir / "deepspeed.json").write_text(json.dumps(build_deepspeed_config(cfg), indent=2) + "\n")
        write_versions(out_dir / "versions.json")
        metrics = (out_dir / "metrics.jsonl").open("a")
        console.note(f"RLHF pipeline: {' -> '.join(cfg.rlhf.stages)}; {process.world_size} rank(s); "
                     f"precision {cfg.training.mixed_precision}; outputs: {out_dir}")

    def log(record: dict) -> None:
        if metrics is not None:
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
        console.log(record)

    try:
        result = run_pipeline(plan, out_dir, process, log, console.note, resume=ns.resume)
    finally:
        if metrics is not None:
            metrics.close()
        leave_process_group()
    if not main_rank:
        return 0 if result.status == "completed" else 1
    summary = {"status": result.status, "stages": result.stages, "seconds": time.perf_counter() - started,
               "output_dir": str(out_dir), **peak_memory()}
    (out_dir / "summary.json").write_text(json.dumps(redact(summary, secret_values()), indent=2) + "\n")
    console.final_table(result.stages)
    for line in reward_curve_lines(result.stages):
        console.note(line)
    memory = ", ".join(f"{k.removeprefix('memory/')} {v:.2f} GB" for k, v in summary.items() if k.startswith("memory/"))
    console.note(f"{result.status}: {len(result.stages)} stage(s) in {summary['seconds']:.0f} s; memory {memory}; "
                 f"outputs in {out_dir}")
    return 0 if result.status == "completed" else 1


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
