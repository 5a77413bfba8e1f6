"""Hand every record of a run to a function: the smallest sink, for scripts and benchmarks."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ava.train.trainer.callback import Callback

if TYPE_CHECKING:
    from ava.train.trainer.trainer import Trainer


class Records(Callback):
    """Calls `function(record)` for each record (steps on logging steps, evaluations, events)."""

    name = "records"

    def __init__(self, function: Callable[[dict[str, Any]], None]) -> None:
        self.function = function

    def on_log(self, trainer: Trainer, record: dict[str, Any]) -> None:
        self.function(record)
