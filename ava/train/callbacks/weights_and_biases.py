"""Weights & Biases: every record's numbers at its step (`ava.train.report.wandb_log.WandbLogger` does the talking).

A W&B failure warns once and stops W&B logging, never the run; metrics.jsonl
keeps every record either way. The run finishes the W&B run with its summary.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ava.train.trainer.callback import Callback

if TYPE_CHECKING:
    from ava.train.report.wandb_log import WandbLogger
    from ava.train.trainer.trainer import Trainer


class Wandb(Callback):
    name = "wandb"

    def __init__(self, logger: WandbLogger) -> None:
        self.logger = logger

    def on_log(self, trainer: Trainer, record: dict[str, Any]) -> None:
        self.logger.log(record)
