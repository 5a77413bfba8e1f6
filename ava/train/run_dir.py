"""A run's output directory: which one, what it holds from the start, and what is left when the run stops.

An output directory that already holds files is never reused, except to
resume the run in it. Rank 0 writes the header files (the resolved config
with every value's origin, the generated DeepSpeed JSON, library versions)
before the first step, so a run that dies early still says what it was.
A run that fails or is interrupted leaves a `summary.json` saying why and
how to continue; its checkpoints stay.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from ava.errors import UserError
from ava.secrets import redact, secret_values


def output_dir_for(requested: str | Path | None, run_name: str, resume: bool, allow_existing: bool = False) -> Path:
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


def same_on_every_rank(path: Path) -> Path:
    """Rank 0's `path` on every rank (a date-stamped default name can differ by a second between ranks)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return path
    chosen = [str(path)]
    dist.broadcast_object_list(chosen, src=0)
    return Path(chosen[0])


def write_header(out_dir: Path, config_yaml: str, ds_config: dict) -> None:
    """config.yaml (with origins), deepspeed.json and versions.json; rank 0, before the first step."""
    from ava.train.runtime.run_info import write_versions

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(config_yaml)
    (out_dir / "deepspeed.json").write_text(json.dumps(ds_config, indent=2) + "\n")
    write_versions(out_dir / "versions.json")


def write_tokens(out_dir: Path, tokens: Any) -> None:
    """The run's tokenizer and special ids in `tokenizer/`, named at the end of config.yaml; rank 0, before step 1.

    Written at the start, not only with the final model, so that a checkpoint
    exported mid-run (or from a run that died) leaves with its tokenizer too,
    even one trained into a cache that has since been cleared.
    """
    from ava.train.checkpoint.export import RUN_TOKENIZER_DIR

    tokens.save(out_dir / RUN_TOKENIZER_DIR)
    saved = (f"; a copy is in {RUN_TOKENIZER_DIR}/tokenizer.json" if tokens.tokenizer is not None
             else f"; its ids are in {RUN_TOKENIZER_DIR}/special_tokens.json")
    with (out_dir / "config.yaml").open("a") as config:
        config.write(f"# tokenizer: {tokens.describe()}{saved}\n")


def write_summary(out_dir: Path, summary: dict[str, Any]) -> None:
    """summary.json, with every secret the config or environment holds masked."""
    (out_dir / "summary.json").write_text(json.dumps(redact(summary, secret_values()), indent=2) + "\n")


def drop_records_after(path: Path, step: int) -> None:
    """Forget metrics the interrupted run logged after its last checkpoint: the resumed run logs them again."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(path)


def resume_hint(out_dir: Path) -> str:
    """How to continue the run in `out_dir` from what it has written."""
    from ava.train.checkpoint.store import latest_complete

    tag = latest_complete(out_dir / "checkpoints")
    return (f"continue with --output_dir {out_dir} --resume (from checkpoints/{tag})" if tag
            else "start the run again: it had not written a complete checkpoint yet")


def record_failure(out_dir: Path, exc: BaseException, started: float, wandb: Any) -> None:
    """Leave a summary.json that says the run failed and why; the checkpoints already written stay."""
    if not out_dir.is_dir():
        return
    status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
    summary = {"status": status, "error": f"{type(exc).__name__}: {exc}", "seconds": time.perf_counter() - started}
    summary["resume_hint"] = resume_hint(out_dir)
    try:
        write_summary(out_dir, summary)
    except OSError as error:  # a full disk is often why the run failed: the original error matters more
        print(f"ava: could not write {out_dir / 'summary.json'} ({error.strerror})", file=sys.stderr)
    if wandb is not None:
        wandb.finish(summary)


def record_preempted(out_dir: Path, result: Any, started: float, wandb: Any) -> dict[str, Any]:
    """summary.json for a run stopped by a signal: where it stopped and how it continues."""
    summary = {"status": "preempted", "steps": result.steps, "planned_steps": result.planned_steps,
               "final_checkpoint": str(result.checkpoint) if result.checkpoint else None,
               "seconds": time.perf_counter() - started,
               "resume_hint": f"continue with --output_dir {out_dir} --resume (or --auto_resume)"}
    write_summary(out_dir, summary)
    if wandb is not None:
        wandb.finish(summary)
    print(f"preempted at step {result.steps} of {result.planned_steps}: checkpoint {result.checkpoint} saved; "
          f"exit code 75 asks the scheduler to requeue; {summary['resume_hint']}", flush=True)
    return summary
