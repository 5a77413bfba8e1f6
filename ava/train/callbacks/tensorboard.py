"""TensorBoard: every number of every record as a scalar at its step (rank 0; `training.tensorboard_dir`).

Like W&B, TensorBoard is an optional view of a run that already writes
metrics.jsonl: a failure to open the directory or to write an event warns
once and stops TensorBoard logging, never the run. Scalars are named as in
W&B (`eval_loss` -> `eval/loss`; `moe/layer0/...` groups under `moe`). The
event file is flushed at each record, so a run that dies loses none of what
it logged; a resumed run purges the events after its checkpoint, as it drops
those records from metrics.jsonl, so the repeated steps are not drawn twice.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ava.errors import UserError
from ava.train.report.wandb_log import metric_name
from ava.train.trainer.callback import Callback

if TYPE_CHECKING:
    from ava.train.trainer.trainer import Trainer

INSTALL_FIX = "install it with `pip install tensorboard` (scripts/setup.sh does), or set training.tensorboard_dir: null"


def log_dir(setting: str, out_dir: Path) -> Path:
    """Where the events go: a relative `setting` under the run's `out_dir`; an absolute one gets the run's name."""
    path = Path(setting).expanduser()
    return path / out_dir.name if path.is_absolute() else out_dir / path


def require_tensorboard() -> None:
    """A user error, before the run starts, when `training.tensorboard_dir` is set but TensorBoard is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401  (imports the tensorboard package)
    except ImportError as exc:
        raise UserError(f"training.tensorboard_dir is set, but TensorBoard cannot be imported ({exc})",
                        INSTALL_FIX) from None


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


class TensorBoard(Callback):
    """Writes each record's numbers to one event file; build it with `start`."""

    name = "tensorboard"

    def __init__(self, writer: Any) -> None:
        self.writer = writer

    @classmethod
    def start(cls, directory: Path, resumed_at: int = 0) -> TensorBoard | None:
        """Open `directory` for events; None, after one warning, when it cannot be opened.

        `resumed_at`: the step of the checkpoint a run in the same directory continues from; the
        events the interrupted run wrote after it are hidden from TensorBoard (its purge_step).
        """
        try:
            from torch.utils.tensorboard import SummaryWriter

            directory.mkdir(parents=True, exist_ok=True)
            writer = SummaryWriter(str(directory), purge_step=resumed_at + 1 if resumed_at else None)
        except Exception as exc:  # a read-only or full disk, a broken install: none may stop training
            _warn(f"TensorBoard did not start in {directory} ({type(exc).__name__}: {exc}); training continues "
                  "without it (metrics.jsonl has every record).")
            return None
        return cls(writer)

    def on_log(self, trainer: Trainer, record: dict[str, Any]) -> None:
        self.log(record)

    def on_train_end(self, trainer: Trainer) -> None:
        # Flush, not close: callbacks after the sinks (the quantized evaluation) still log at the end of a
        # run; the runner closes the writer when training is over (`close`).
        if self.writer is not None:
            try:
                self.writer.flush()
            except Exception as exc:
                _warn(f"TensorBoard logging failed ({type(exc).__name__}: {exc}); training continues without it "
                      "(metrics.jsonl has every record).")
                self._drop()

    def log(self, record: dict[str, Any]) -> None:
        """Write the numbers of one record at its step; text (an event's reason) is left to metrics.jsonl."""
        if self.writer is None:
            return
        scalars = {metric_name(k): v for k, v in record.items()
                   if k != "step" and isinstance(v, int | float) and not isinstance(v, bool)}
        if not scalars or "step" not in record:
            return
        try:
            step = int(record["step"])
            for tag, value in scalars.items():
                self.writer.add_scalar(tag, value, step)
            self.writer.flush()
        except Exception as exc:
            _warn(f"TensorBoard logging failed ({type(exc).__name__}: {exc}); training continues without it "
                  "(metrics.jsonl has every record).")
            self._drop()

    def close(self) -> None:
        """Flush and close the event file (a later record would open a new one)."""
        if self.writer is None:
            return
        try:
            self.writer.close()
        except Exception as exc:
            _warn(f"TensorBoard could not close its event file ({type(exc).__name__}: {exc}).")
            self.writer = None

    def _drop(self) -> None:
        writer, self.writer = self.writer, None
        try:
            writer.close()
        except Exception:  # already failing: the warning has been given
            pass
