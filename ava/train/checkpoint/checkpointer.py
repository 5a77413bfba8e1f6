"""A run's checkpoint writer and reader: the module's engines, its data position and each callback's state.

The layout of one checkpoint (`ava.train.checkpoint.store` writes it atomically):
DeepSpeed's files of every engine the module trains, and one Ava state file
per rank holding

    {"step": N, "data": <the module's state_dict>, "rng": <every RNG state>,
     "callbacks": {<callback name>: <its state_dict>, ...}}

Checkpoints written before callbacks existed keep each state under its own
top-level key ("monitor", "health"); `CallbackList.load_state_dict` reads those.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ava.train.checkpoint import elastic
from ava.train.checkpoint import store as checkpoint
from ava.train.runtime.faults import FaultPlan

if TYPE_CHECKING:
    from ava.train.trainer.trainer import Trainer


class Checkpointer:
    """Saves and restores a trainer's state under `root` (checkpoints/), keeping the newest `keep_last`."""

    def __init__(self, root: Path, rank: int, keep_last: int, faults: FaultPlan | None = None) -> None:
        self.root, self.rank, self.keep_last, self.faults = root, rank, keep_last, faults
        self.saved_step: int | None = None  # the step the newest checkpoint of this process holds

    def _engines(self, trainer: Trainer) -> Any:
        engines = dict(trainer.module.engines)
        return next(iter(engines.values())) if len(engines) == 1 else engines

    def save(self, trainer: Trainer) -> Path | None:
        """Write the trainer's current step (collective); None when that step is saved already."""
        step = trainer.step
        if self.saved_step == step:
            return None
        faults = self.faults
        at = (lambda point: faults.at_save(step, self.rank, point)) if faults is not None else None
        path = checkpoint.save(self._engines(trainer), self.root, step, self.rank, trainer.module.state_dict(),
                               self.keep_last, extra={"callbacks": trainer.callbacks.state_dict()}, at=at)
        self.saved_step = step
        return path

    def load(self, trainer: Trainer, point: Path) -> dict[str, Any]:
        """Load `point` (a checkpoint directory) into the trainer's engines; returns this rank's Ava state.

        A checkpoint written by another number of ranks loads through DeepSpeed's universal checkpoint
        (`ava.train.checkpoint.elastic`); a rank it did not have takes rank 0's Ava state.
        """
        import torch.distributed as dist

        written = elastic.written_ranks(point)
        world = dist.get_world_size() if dist.is_initialized() else 1
        engines = self._engines(trainer)
        if written and written != world:
            placed = engines.items() if isinstance(engines, dict) else [(None, engines)]
            for name, engine in placed:
                directory = point if name is None else point / name
                if elastic.partitioned(directory):
                    elastic.universal_copy(directory, self.rank == 0)
                    elastic.load_universal(engine, directory)
                else:  # one whole copy of everything: every rank loads it as it is
                    checkpoint.load(engine if name is None else {name: engine}, point.parent, point.name, 0)
            state = checkpoint.read_state(point / f"ava_state_rank{min(self.rank, written - 1)}.pt")
            checkpoint.set_rng_state(state["rng"])
        else:
            state = checkpoint.load(engines, point.parent, point.name, self.rank)
        self.saved_step = int(state["step"])
        return state

    def latest(self) -> Path | None:
        """The newest complete checkpoint under `root`, if any."""
        tag = checkpoint.latest_complete(self.root)
        return self.root / tag if tag is not None else None
