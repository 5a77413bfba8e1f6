"""Weights & Biases logging for rank 0, which never takes the training run down with it.

W&B is an optional view of a run that already writes metrics.jsonl, so any
failure to start (not logged in, no network) or to log costs a warning, not
the run. `WANDB_MODE` is honoured as W&B itself reads it: `offline` needs no
network or login, and `wandb sync` uploads the run later.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from ava.secrets import redact, redact_text, secret_values

ENDED_WELL = ("completed", "early_stopped")
FIX = ("run `wandb login` (or set WANDB_API_KEY) for online logging, or set WANDB_MODE=offline "
       "and upload later with `wandb sync`")


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def metric_name(key: str) -> str:
    """W&B name of a record key: evaluation keys go under `eval/` (best_eval_loss -> eval/best_loss), others keep theirs."""
    return "eval/" + key.replace("eval_", "", 1) if "eval_" in key else key


class WandbLogger:
    """One W&B run; build it with `start`."""

    def __init__(self, run: Any) -> None:
        self.run = run

    @classmethod
    def start(cls, config_dict: dict, project: str, entity: str | None, run_name: str | None, run_dir: Path,
              init_timeout: float = 60.0) -> WandbLogger | None:
        """Start a W&B run writing under `run_dir/wandb/`; None, after one warning, when it cannot start.

        `init_timeout` bounds the wait for W&B's server: without network, W&B would
        otherwise retry for minutes before giving up.
        """
        try:
            import wandb

            # Without credentials wandb.init would prompt on a terminal, and wait for ever if nobody answers.
            mode = wandb.setup().settings.mode
            if mode not in ("offline", "dryrun", "disabled") and not wandb.login(prompt=False, verify=False):
                _warn(f"W&B is not logged in; training continues without it. Fix: {FIX}.")
                return None
            run_dir.mkdir(parents=True, exist_ok=True)
            # the config and name are uploaded and shown to everyone who can see the project: no secret may ride along
            secrets = secret_values()
            run = wandb.init(project=project, entity=entity, dir=str(run_dir),
                             name=redact_text(run_name, secrets) if run_name else run_name,
                             config=redact(config_dict, secrets),
                             settings=wandb.Settings(init_timeout=init_timeout))
        except Exception as exc:  # wandb raises UsageError, CommError, timeouts...: none may stop training
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            _warn(f"W&B did not start ({type(exc).__name__}: {reason}); training continues without it. Fix: {FIX}.")
            return None
        if run.disabled:  # WANDB_MODE=disabled
            _warn(f"W&B is disabled for this run (WANDB_MODE=disabled); to log to W&B, {FIX}.")
            run.finish()
            return None
        return cls(run)

    def log(self, record: dict) -> None:
        """Log the numbers of one on_log record at its step; a W&B failure warns once and stops W&B logging, not the run.

        Text (an event record's reason) is left to metrics.jsonl: in W&B's history it would only clutter the charts.
        """
        if self.run is None:
            return
        metrics = {metric_name(k): v for k, v in record.items()
                   if k != "step" and isinstance(v, int | float) and not isinstance(v, bool)}
        if not metrics:
            return
        try:
            self.run.log(metrics, step=int(record["step"]))
        except Exception as exc:
            _warn(f"W&B logging failed ({type(exc).__name__}: {exc}); metrics.jsonl still has every record.")
            self.run = None

    def finish(self, summary: dict) -> None:
        """Store the end-of-run summary on the run and close it.

        The W&B run is marked failed (exit code 1) unless the status is one of ENDED_WELL.
        """
        if self.run is None:
            return
        run, self.run = self.run, None
        summary = redact(summary, secret_values())  # a failed run's summary quotes its exception
        try:
            run.summary.update({k: v if isinstance(v, bool | int | float | str | dict | list) else str(v)
                                for k, v in summary.items() if v is not None})
            run.finish(exit_code=0 if summary.get("status", "completed") in ENDED_WELL else 1)
        except Exception as exc:
            _warn(f"W&B could not finish the run ({type(exc).__name__}: {exc}).")
