"""metrics.jsonl: every record of the run, one JSON object a line, flushed as it is written.

Step records also carry the process's peak memory so far (`memory/...`),
added here before the callbacks after this one (console, W&B) see the
record. A full disk stops the run with a user error naming the file; the
checkpoints written so far stay, and the message says how to continue.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from ava.errors import UserError
from ava.train.runtime.run_info import peak_memory
from ava.train.trainer.callback import Callback

if TYPE_CHECKING:
    from ava.train.trainer.trainer import Trainer


class MetricsFile(Callback):
    """Appends each record to `path` (rank 0 only; the run opens and closes the file)."""

    name = "metrics_file"

    def __init__(self, file: TextIO, path: Path, resume_hint: Any) -> None:
        self.file, self.path, self.resume_hint = file, path, resume_hint

    def on_log(self, trainer: Trainer, record: dict[str, Any]) -> None:
        if "loss" in record:
            record.update(peak_memory())
        self.write(record)

    def write(self, record: dict[str, Any]) -> None:
        """Append one record (also for writers outside a Trainer: the RLHF pipeline's notes and stages)."""
        try:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        except OSError as error:  # a full disk: stop with the checkpoints written so far, not a traceback
            raise UserError(f"could not append to {self.path}: {error.strerror}",
                            f"free space on {self.path.parent}, then {self.resume_hint()}") from None
