"""A run's output directory: which one, what it holds from the start, and what is left when the run stops.

An output directory that already holds files is never reused, except to
resume the run in it. Rank 0 writes the header files (the resolved config
with every value's origin, the generated DeepSpeed JSON, library versions)
before the first step, so a run that dies early still says what it was.
A run that fails or is interrupted leaves a `summary.json` saying why and
how to continue; its checkpoints stay.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ava.errors import UserError
from ava.secrets import redact, secret_values


def output_dir_for(requested: str | Path | None, run_name: str, resume: bool, allow_existing: bool = False) -> Path:
    """The run's output directory: refused when it already holds files, unless resuming (then it must exist).

    Also refused, before any work, when it is a file or this process could
    not write there (`require_writable`): a run must not fail on its first
    file after minutes of setup.
    """
    if resume:
        if requested is None or _kind(Path(requested), resume) != "dir":
            raise UserError(f"--resume needs the --output_dir of the run to continue (got {requested})",
                            "pass --output_dir RUN_DIR, the directory the interrupted run wrote")
        require_writable(Path(requested), resume=True)
        return Path(requested)
    # The default (outputs/<run_name>) is checked too: a fixed training.run_name names the same directory twice.
    path = Path(requested) if requested is not None else Path("outputs") / run_name
    kind = _kind(path, allow_existing)
    if kind == "file":
        raise UserError(f"the output directory {path} is a file, not a directory",
                        "pass an --output_dir that is a directory, or a path that does not exist yet")
    if kind == "dir" and _holds_files(path) and not allow_existing:
        raise UserError(f"the output directory {path} already holds files; Ava never overwrites a run",
                        "choose a new --output_dir (or training.run_name), or add --resume (with "
                        "--output_dir) to continue the run in it")
    require_writable(path, resume=allow_existing)
    return path


def require_writable(path: Path, resume: bool = False) -> None:
    """Refuse an output directory this process cannot create or write in, found by writing, not by reading modes.

    The probe creates and removes a file in `path`, or (when it does not exist
    yet) in its nearest existing ancestor, where `mkdir` would create it:
    permission bits say nothing for root and nothing of a read-only mount.
    `resume`: the run to write in is already there (the fix differs).
    """
    existing = path
    while (kind := _kind(existing, resume, path)) is None and existing.parent != existing:
        existing = existing.parent
    if kind == "file":
        raise UserError(f"the output directory {path} cannot be created: {existing} is a file, not a directory",
                        "pass an --output_dir whose parents are directories (or that does not exist yet)")
    try:
        handle, probe = tempfile.mkstemp(prefix=".ava-write-probe-", dir=existing)
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        raise _unwritable(path, existing, error, resume) from None


def _kind(path: Path, resume: bool, asked: Path | None = None) -> str | None:
    """"dir", "file" (whatever else is there) or None (nothing); a path that cannot even be looked up is refused."""
    try:
        return "dir" if stat.S_ISDIR(path.stat().st_mode) else "file"
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as error:  # a parent this user may not search, a loop of links
        raise _unwritable(asked or path, path, error, resume, looking=True) from None


def _holds_files(path: Path) -> bool:
    try:
        return any(path.iterdir())
    except OSError:  # not even listable: require_writable says why
        return False


def _unwritable(path: Path, where: Path, error: OSError, resume: bool, looking: bool = False) -> UserError:
    where = where.absolute()  # not "." for a relative --output_dir
    if error.errno == errno.EROFS:
        why = f"{where} is on a read-only file system"
    elif error.errno in (errno.EACCES, errno.EPERM):
        why = f"no permission to {'reach' if looking else 'write in'} {where}"
    else:
        why = f"{'looking up' if looking else 'writing a file in'} {where} failed ({error.strerror})"
    fix = ("make it writable to continue the run there (or copy the run to a writable disk and resume the copy)"
           if resume else "pass an --output_dir on a disk this user can write (or make that directory writable)")
    return UserError(f"the output directory {path} cannot be written: {why}", fix)


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
    interrupted = isinstance(exc, KeyboardInterrupt)  # a second Ctrl-C: stopped at once, without a checkpoint
    summary = {"status": "interrupted" if interrupted else "failed",
               "error": "stopped at once by Ctrl-C" if interrupted else f"{type(exc).__name__}: {exc}",
               "seconds": time.perf_counter() - started}
    summary["resume_hint"] = resume_hint(out_dir)
    if interrupted:
        print(f"ava: stopped at once, without a new checkpoint; {summary['resume_hint']}", file=sys.stderr, flush=True)
    try:
        write_summary(out_dir, summary)
    except OSError as error:  # a full disk is often why the run failed: the original error matters more
        print(f"ava: could not write {out_dir / 'summary.json'} ({error.strerror})", file=sys.stderr)
    if wandb is not None:
        wandb.finish(summary)


def record_preempted(out_dir: Path, result: Any, started: float, wandb: Any,
                     status: str = "preempted") -> dict[str, Any]:
    """summary.json for a run stopped by a signal (`status` "interrupted": a Ctrl-C): where it stopped, how it continues."""
    summary = {"status": status, "steps": result.steps, "planned_steps": result.planned_steps,
               "final_checkpoint": str(result.checkpoint) if result.checkpoint else None,
               "seconds": time.perf_counter() - started,
               "resume_hint": f"continue with --output_dir {out_dir} --resume"
                              + (" (or --auto_resume)" if status == "preempted" else "")}
    write_summary(out_dir, summary)
    if wandb is not None:
        wandb.finish(summary)
    why = ("exit code 75 asks the scheduler to requeue" if status == "preempted"
           else "stopped by Ctrl-C (exit code 130)")
    print(f"{status} at step {result.steps} of {result.planned_steps}: checkpoint {result.checkpoint} saved; "
          f"{why}; {summary['resume_hint']}", flush=True)
    return summary
