"""The console: step lines or a live progress bar, evaluation lines, events, and the capacity-overflow warning.

Rendering lives in `ava.train.report.console.RunConsole`; this callback feeds it
every record. For MoE models it also watches each step's dropped-token share
and warns, live, the first time it passes the threshold and again each time
it doubles (`ava.train.report.expert_usage.OverflowWatch`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ava.train.trainer.callback import Callback

if TYPE_CHECKING:
    from ava.train.report.console import RunConsole
    from ava.train.report.expert_usage import OverflowWatch
    from ava.train.trainer.trainer import Trainer


class Console(Callback):
    """Shows each record on `console`; with `overflow`, warns when a step drops too many tokens."""

    name = "console"

    def __init__(self, console: RunConsole, overflow: OverflowWatch | None = None) -> None:
        self.console, self.overflow = console, overflow

    def on_log(self, trainer: Trainer, record: dict[str, Any]) -> None:
        self.console.log(record)
        if self.overflow is not None and (message := self.overflow.check(record)) is not None:
            self.console.warn(message)
