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
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ava.model.errors import ModelInputError

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
    state: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(),
                             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(engine: Any, root: Path, step: int, rank: int, data_state: dict, keep_last: int,
         extra: dict[str, Any] | None = None) -> Path:
    """Write checkpoint `step` on every rank (collective: every rank must call it).

    `extra` is more client state to restore on resume (the evaluation monitor).
    """
    tag = tag_for(step)
    engine.save_checkpoint(str(root), tag=tag, save_latest=False)
    torch.save({"step": step, "data": data_state, "rng": rng_state(), **(extra or {})},
               root / tag / f"ava_state_rank{rank}.pt")
    torch.distributed.barrier()
    if rank == 0:
        _write_atomic(root / tag / COMPLETE, f"{step}\n")
        _write_atomic(root / LATEST, f"{tag}\n")
        _prune(root, keep_last)
    torch.distributed.barrier()
    return root / tag


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


def _prune(root: Path, keep_last: int) -> None:
    tags = sorted(p for p in root.iterdir() if p.is_dir() and (p / COMPLETE).is_file())
    keep = best_tag(root)
    for old in tags[:-keep_last] if keep_last > 0 else []:
        if old.name != keep:
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


def load(engine: Any, root: Path, tag: str, rank: int) -> dict[str, Any]:
    """Restore engine, optimizer and scheduler from `tag`, and return this rank's Ava state (step, data, rng)."""
    path, _ = engine.load_checkpoint(str(root), tag=tag)
    if path is None:
        raise ModelInputError(f"DeepSpeed could not load checkpoint {root / tag}",
                              "check that the directory is complete and was written with this configuration")
    state_file = root / tag / f"ava_state_rank{rank}.pt"
    if not state_file.is_file():
        raise ModelInputError(f"{state_file} is missing: the checkpoint was written by a run with fewer ranks",
                              "resume with the number of ranks the checkpoint was written with")
    state = torch.load(state_file, weights_only=False)  # our own file: python/numpy RNG states are pickled
    set_rng_state(state["rng"])
    return state
