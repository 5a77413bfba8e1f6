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
import os
import sys
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from ava.cli.args import add_stack_arguments, new_parser, stack_from
from ava.cli.render import render_yaml
from ava.config import build_deepspeed_config, load_config
from ava.config.loader import ResolvedConfig
from ava.model.errors import ModelInputError


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
    ns, extras = parser.parse_known_args(argv)
    stack = stack_from(ns, extras)
    resolved = load_config(stack.files, stack.overrides, stack.world)
    main_rank = os.environ.get("RANK", "0") == "0"
    if main_rank:
        for notice in resolved.notices:
            print(notice.render(), file=sys.stderr)
    if ns.dry_run:
        if main_rank:
            _print_plan(resolved)
        return 0
    return _train(resolved, ns, Path(stack.files.config or "run").stem, main_rank)


def _print_plan(resolved: ResolvedConfig) -> None:
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


def _output_dir(requested: str | None, config_name: str, resume: bool) -> Path:
    if resume:
        if requested is None or not Path(requested).is_dir():
            raise ModelInputError(f"--resume needs the --output_dir of the run to continue (got {requested})",
                                  "pass --output_dir RUN_DIR, the directory the interrupted run wrote")
        return Path(requested)
    if requested is None:
        return Path("outputs") / f"{config_name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    path = Path(requested)
    if path.exists() and any(path.iterdir()):
        raise ModelInputError(f"--output_dir {path} already holds files; Ava never overwrites a run",
                              "choose a new --output_dir, or add --resume to continue the run in it")
    return path


BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def _resume_point(ns: Any, out_dir: Path, ds_config: dict) -> Path | None:
    """The checkpoint directory to resume from, after refusing a changed batch configuration."""
    from ava.train import checkpoint

    if ns.resume_from:
        point = Path(ns.resume_from)
        if not (point / checkpoint.COMPLETE).is_file():
            raise ModelInputError(f"--resume_from {point} is not a complete Ava checkpoint (no {checkpoint.COMPLETE})",
                                  "point at a checkpoints/stepNNNNNNNN directory written to the end")
        previous_ds = point.parent.parent / "deepspeed.json"
    elif ns.resume:
        tag = checkpoint.latest_complete(out_dir / "checkpoints")
        if tag is None:
            raise ModelInputError(f"{out_dir / 'checkpoints'} holds no complete checkpoint to resume from",
                                  "start a new run with a new --output_dir")
        point, previous_ds = out_dir / "checkpoints" / tag, out_dir / "deepspeed.json"
    else:
        return None
    if previous_ds.is_file() and not ns.force_resume:
        before = json.loads(previous_ds.read_text())
        changed = [f"{k}: {before.get(k)} -> {ds_config.get(k)}" for k in BATCH_KEYS if before.get(k) != ds_config.get(k)]
        if changed:
            raise ModelInputError("the batch configuration differs from the checkpoint's (" + "; ".join(changed)
                                  + "), so the resumed run would not continue the same training",
                                  "resume with the original batch settings and number of ranks, or pass --force_resume")
    return point


def _train(resolved: ResolvedConfig, ns: Any, config_name: str, main_rank: bool) -> int:
    started = time.perf_counter()
    cfg = resolved.config
    from ava.train.data_setup import build_training_data
    from ava.train.distributed import init_distributed
    from ava.train.loop import train

    out_dir = _output_dir(ns.output_dir, config_name, ns.resume)  # before any heavy work: refuse early
    ds_config = build_deepspeed_config(cfg)
    resume_from = _resume_point(ns, out_dir, ds_config)
    process = init_distributed()
    if process.world_size != resolved.batch.world.size:
        raise ModelInputError(
            f"the launcher started {process.world_size} process(es) but the batch was planned for "
            f"{resolved.batch.world.size} ({resolved.batch.world.source})",
            "pass the same --num_gpus/--num_nodes to the launcher and to train.py, or set WORLD_SIZE")
    b = resolved.batch
    steps_hint = cfg.training.max_steps or 1000
    data = build_training_data(cfg.data, cfg.model.vocab_size, b.micro, cfg.data.eval_batch_size, process.rank,
                               process.world_size, needed_sequences=steps_hint * b.global_batch)
    metrics = None
    if main_rank:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(render_yaml(resolved, with_origins=True))
        (out_dir / "deepspeed.json").write_text(json.dumps(ds_config, indent=2) + "\n")
        if resume_from is not None and ns.resume:
            _drop_records_after(out_dir / "metrics.jsonl", int(resume_from.name.removeprefix("step")))
        metrics = (out_dir / "metrics.jsonl").open("a")
        if resume_from is not None:
            print(f"resuming from {resume_from}")
        print(f"data: {data.description}")
        print(f"batch: {b.micro} x {b.accumulation} x {b.world.size} rank(s) = {b.global_batch} sequences "
              f"per step; precision {cfg.training.mixed_precision}; ZeRO stage {cfg.deepspeed.zero_stage}")
        print(f"outputs: {out_dir}")

    def on_log(record: dict) -> None:
        if metrics is None:
            return
        metrics.write(json.dumps(record) + "\n")
        metrics.flush()
        if "loss" in record:
            print(f"step {record['step']:>6}  loss {record['loss']:.4f}  lr {record['lr']:.2e}  "
                  f"{record['tokens_per_s']:,.0f} tok/s", flush=True)
        elif "eval_loss" in record:
            print(f"eval at step {record['step']}: loss {record['eval_loss']:.4f}  "
                  f"perplexity {record['eval_perplexity']:.2f}", flush=True)

    try:
        result = train(cfg, ds_config, process, data.train, data.eval, on_log,
                       checkpoint_dir=out_dir / "checkpoints", resume_from=resume_from)
    finally:
        if metrics is not None:
            metrics.close()
        _shutdown()
    if main_rank:
        first, final = (result.losses[0], result.losses[-1]) if result.losses else (None, None)
        summary = {"status": "completed", "steps": result.steps, "first_loss": first, "final_loss": final,
                   "eval_loss": result.eval_loss, "tokens": result.tokens,
                   "seconds": time.perf_counter() - started, "first_step_seconds": result.first_step_seconds,
                   "entropy_rate": data.entropy_rate}
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        losses = f", loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f}" if result.losses else ""
        print(f"done: {result.steps} steps{losses}"
              + (f", eval loss {result.eval_loss:.4f}" if result.eval_loss is not None else "")
              + f", {summary['seconds']:.1f} s ({result.first_step_seconds:.1f} s to the first step); "
              f"outputs in {out_dir}")
    return 0


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
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
