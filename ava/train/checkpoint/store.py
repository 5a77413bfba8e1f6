"""Checkpoints a run can always resume from.

DeepSpeed writes the model, optimizer and LR-scheduler state of every rank
under `checkpoints/<tag>/`. Ava adds one file per rank with what DeepSpeed
does not keep per rank: the step, the data position and every RNG state.
Only after all ranks have finished writing (a barrier) does rank 0 mark the
tag complete and then move `latest` to it, each with an atomic rename. A
crash at any point mid-save therefore leaves `latest` on the previous
complete checkpoint, never on a partial one.

The best checkpoint by validation loss is not a second copy: `best` names
one of the step checkpoints, and pruning to the last K never removes it.

Ava's per-rank file holds only tensors and plain values (numbers, strings,
lists, tuples, dicts), so it is read with `torch.load(weights_only=True)`:
a checkpoint directory copied from elsewhere cannot run code on resume.
"""

from __future__ import annotations

import errno
import gc
import os
import pickle
import random
import re
import shutil
from collections import deque
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ava.errors import UserError
from ava.train.runtime.lost_rank import is_lost_peer

LATEST = "latest"
BEST = "best"
COMPLETE = "COMPLETE"


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state() -> dict[str, Any]:
    """Every RNG state of this process, as tensors and plain values that `weights_only=True` loading accepts.

    numpy's legacy state is a tuple holding a uint32 array, which would need
    numpy's unpickling globals; its key goes in an int64 tensor instead.
    """
    bit_generator, key, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": random.getstate(),  # (version, tuple of ints, gauss_next): already plain
        "numpy": {"bit_generator": str(bit_generator), "key": torch.from_numpy(np.asarray(key, dtype=np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` captured: the next numbers drawn are those the saving process would have drawn."""
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    n = state["numpy"]
    if isinstance(n, tuple):  # an older Ava's file: numpy's own state tuple
        np.random.set_state(n)
    else:
        np.random.set_state((n["bit_generator"], n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                             n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def plain(value: Any) -> Any:
    """`value` as tensors and plain Python values, which `torch.load(weights_only=True)` reads back.

    Client state (the data position, the evaluation and health monitors) may
    hold numpy scalars or a deque; a type that cannot be made plain is a bug
    caught here, at save, rather than at the resume that needs the file.
    """
    # Exact types: a subclass (np.float64 is a float, an IntEnum an int) pickles as its own class.
    if value is None or type(value) in (bool, int, float, str, bytes) or isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value.copy())
    if isinstance(value, Mapping):
        return {plain(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | deque):
        return [plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(plain(v) for v in value)
    raise TypeError(f"checkpoint state holds a {type(value).__qualname__} ({value!r:.80}), which "
                    "torch.load(weights_only=True) cannot read; convert it to plain values in its state_dict()")


def save(engine: Any, root: Path, step: int, rank: int, data_state: dict, keep_last: int,
         extra: dict[str, Any] | None = None, at: Callable[[str], None] | None = None) -> Path:
    """Write checkpoint `step` on every rank (collective: every rank must call it).

    `engine` is one DeepSpeed engine, written in the tag's directory, or a
    mapping {name: engine} (an RLHF stage's actor and critic), each written
    in a subdirectory of its name. `extra` is more client state to restore
    on resume (each callback's state).
    `at` is called at each of `ava.train.runtime.faults.SAVE_POINTS`: the fault tests
    kill the process there to show that no point leaves a checkpoint that
    resume would trust but could not load.

    A full disk (or quota) while writing is a `CheckpointWriteError` naming the
    directory; the partial checkpoint is removed, and `latest` still names the
    previous complete one, which is never pruned before a newer one completes.
    """
    tag = tag_for(step)
    point = at or (lambda _: None)
    reason: str | None = None
    if rank == 0:  # saving a step again (a resume after a kill at after_complete): it is not complete until rewritten
        (root / tag / COMPLETE).unlink(missing_ok=True)
    try:
        point("before_deepspeed")
        for directory, name, each in _placed(engine, root, tag):
            each.save_checkpoint(directory, tag=name, save_latest=False)
        point("after_deepspeed")
        torch.save(plain({"step": step, "data": data_state, "rng": rng_state(), **(extra or {})}),
                   root / tag / f"ava_state_rank{rank}.pt")
        point("after_state")
    except Exception as exc:
        reason = _out_of_space(exc, root)
        if reason is None:
            raise
    if reason is not None:
        # The failed writer's open file lives on in the exception's frames; collecting them closes it, so that
        # removing the partial checkpoint really frees its space (for summary.json, and for the user).
        gc.collect()
        alone = torch.distributed.get_world_size() == 1
        if alone:  # with several ranks the others may still be writing there; resume ignores it, the next save prunes it
            shutil.rmtree(root / tag, ignore_errors=True)
        previous = latest_complete(root)
        raise CheckpointWriteError(
            ("could not write checkpoint" if alone else f"rank {rank} could not write its part of checkpoint")
            + f" {root / tag}: {reason}; the partial checkpoint "
            + ("was removed" if alone else "is incomplete, so resuming ignores it (delete it to free its space)")
            + " and " + (f"{root / previous} is intact" if previous else "no earlier checkpoint exists"),
            f"free space on {root} (or move the run to a larger disk), then "
            + (f"continue with --output_dir {root.parent} --resume" if previous else
               "start the run again (it had no complete checkpoint yet)")) from None
    torch.distributed.barrier()
    if rank == 0:
        _write_atomic(root / tag / COMPLETE, f"{step}\n")
        point("after_complete")
        _write_atomic(root / LATEST, f"{tag}\n")
        point("after_latest")
        _prune(root, keep_last, point)
    torch.distributed.barrier()
    return root / tag


def _out_of_space(exc: BaseException, root: Path) -> str | None:
    """Why a failed write comes down to space ("No space left on device", a quota), or None when it does not.

    torch's zip writer reports a full disk as a RuntimeError ("unexpected pos
    ...", "iostream error") whose chain may or may not include the OSError
    (ENOSPC), so the chain is searched and, failing that, a small write is
    tried beside the checkpoint: free-space figures would miss a quota.
    A DeepSpeed barrier broken by another rank leaving (its own disk full,
    say) is that rank's failure, not this rank's write: None.
    """
    if is_lost_peer(exc):
        return None
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _NO_SPACE:
            return current.strerror or os.strerror(current.errno)
        current = current.__cause__ or current.__context__
    probe = root / f".space_probe.{os.getpid()}"
    try:
        with open(probe, "wb") as f:
            f.write(bytes(_PROBE_BYTES))
            f.flush()
            os.fsync(f.fileno())
    except OSError as error:
        return (error.strerror or os.strerror(error.errno)) if error.errno in _NO_SPACE else None
    finally:
        probe.unlink(missing_ok=True)
    return None


_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_PROBE_BYTES = 1 << 20


class CheckpointWriteError(UserError):
    """A checkpoint could not be written for want of space: the run stops, its earlier checkpoints intact."""

    every_rank = True  # the disk may be one rank's own: the rank that hit it must say so, not only rank 0


def mark_best(root: Path, step: int) -> None:
    """Point `best` at the (complete) checkpoint of `step`; rank 0 only."""
    tag = tag_for(step)
    if not (root / tag / COMPLETE).is_file():
        raise RuntimeError(f"cannot mark {root / tag} best: it is not a complete checkpoint")
    _write_atomic(root / BEST, f"{tag}\n")


def best_tag(root: Path) -> str | None:
    """The tag `best` names, when that checkpoint is complete."""
    pointer = root / BEST
    if pointer.is_file():
        tag = pointer.read_text().strip()
        if (root / tag / COMPLETE).is_file():
            return tag
    return None


def _prune(root: Path, keep_last: int, point: Callable[[str], None] | None = None) -> None:
    """Delete old complete checkpoints (never `latest` or `best`) and the leftovers of interrupted saves.

    A checkpoint is unmarked (its COMPLETE removed) before its files are, so
    a crash mid-deletion leaves an incomplete directory that nothing trusts,
    never a "complete" one with files missing. Runs after the save's barrier,
    so any other incomplete step directory is debris from a crash.
    """
    steps = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step"))
    tags = [p for p in steps if (p / COMPLETE).is_file()]
    keep = {best_tag(root), latest_complete(root)}
    doomed = [old for old in (tags[:-keep_last] if keep_last > 0 else []) if old.name not in keep]
    doomed += [p for p in steps if not (p / COMPLETE).is_file() and p.name not in keep]
    for old in doomed:
        (old / COMPLETE).unlink(missing_ok=True)
        if point is not None:
            point("during_prune")
        shutil.rmtree(old, ignore_errors=True)


def prune(root: Path, keep_last: int) -> None:
    """Delete complete checkpoints beyond the newest `keep_last`, never the best; rank 0 only."""
    _prune(root, keep_last)


def latest_complete(root: Path) -> str | None:
    """The tag `latest` names if that checkpoint is complete, else the newest complete one; None if none."""
    pointer = root / LATEST
    if pointer.is_file():
        tag = pointer.read_text().strip()
        if (root / tag / COMPLETE).is_file():
            return tag
    complete = sorted(p.name for p in root.iterdir() if p.is_dir() and (p / COMPLETE).is_file()) if root.is_dir() else []
    return complete[-1] if complete else None


def _placed(engine: Any, root: Path, tag: str) -> list[tuple[str, str, Any]]:
    """(directory, tag, engine) for DeepSpeed's save/load: one engine in `root/tag`, several in `root/tag/<name>`."""
    if isinstance(engine, Mapping):
        return [(str(root / tag), name, each) for name, each in engine.items()]
    return [(str(root), tag, engine)]


def load(engine: Any, root: Path, tag: str, rank: int) -> dict[str, Any]:
    """Restore engine(s), optimizer and scheduler from `tag`, and return this rank's Ava state (step, data, rng).

    `engine`: one DeepSpeed engine or a mapping {name: engine}, as `save` was given.
    """
    for directory, name, each in _placed(engine, root, tag):
        try:
            path, _ = each.load_checkpoint(directory, tag=name)
        except ValueError as exc:
            if "number of parameter groups" not in str(exc):
                raise
            raise UserError(
                f"checkpoint {Path(directory) / name} holds an optimizer with another number of parameter groups "
                "than this run builds: the groups follow training.weight_decay_exclude, and a checkpoint written "
                "before that setting existed (or with it set to []) has a single group",
                "resume with the setting the checkpoint was written with, e.g. --training.weight_decay_exclude=[] "
                "(decay every parameter, as Ava did before the setting existed)") from exc
        if path is None:
            raise UserError(f"DeepSpeed could not load checkpoint {Path(directory) / name}",
                            "check that the directory is complete and was written with this configuration")
    state_file = root / tag / f"ava_state_rank{rank}.pt"
    if not state_file.is_file():
        raise UserError(f"{state_file} is missing: the checkpoint was written by a run with fewer ranks",
                        "resume with the number of ranks the checkpoint was written with")
    state = read_state(state_file)
    set_rng_state(state["rng"])
    return state


RESUME_EARLIER = "resume from an earlier complete checkpoint (--resume_from RUN/checkpoints/stepNNNNNNNN)"


def read_state(path: Path) -> dict[str, Any]:
    """One rank's Ava state file, read without running any code it may contain.

    `weights_only=True` refuses pickled callables and classes, so a tampered
    file is an error, not code execution; a truncated file is an error too.
    """
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            if "numpy" not in str(exc):
                raise
            # Written by an Ava that pickled numpy's RNG state and scalars: admit numpy's array and scalar
            # constructors (data only, no code), so that runs checkpointed before the upgrade still resume.
            with torch.serialization.safe_globals(_numpy_state_globals()):
                state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a damaged file fails in many ways (EOFError, OSError, KeyError, UnpicklingError...)
        raise UserError(f"{path} cannot be read as Ava checkpoint state ({_reason(exc)}): the checkpoint is "
                        "corrupt, or the file was not written by Ava", RESUME_EARLIER) from None
    if not isinstance(state, dict) or not {"step", "data", "rng"} <= state.keys():
        raise UserError(f"{path} is not Ava checkpoint state: it lacks the step, data position and RNG states",
                        RESUME_EARLIER)
    return state


def _numpy_state_globals() -> list[Any]:
    """The numpy globals an older Ava's state file references: array, scalar and dtype reconstruction."""
    try:
        from numpy._core import multiarray
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray  # type: ignore[no-redef]
    dtypes = {type(np.dtype(name)) for name in ("bool", "int32", "int64", "uint32", "float32", "float64")}
    return [multiarray._reconstruct, multiarray.scalar, np.ndarray, np.dtype, *dtypes,
            (multiarray._reconstruct, "numpy.core.multiarray._reconstruct"),
            (multiarray.scalar, "numpy.core.multiarray.scalar")]


def _reason(exc: Exception) -> str:
    """The useful line of a load error; torch's weights_only message otherwise suggests weights_only=False."""
    text = str(exc)
    found = re.search(r"WeightsUnpickler error:\s*(.+?)(?: was not an allowed global|\. Please|\n|$)", text)
    detail = found.group(1).strip() if found else (text.strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
