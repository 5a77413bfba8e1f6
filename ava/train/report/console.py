"""What a run shows on rank 0's console: a progress bar on a terminal, one plain line per log elsewhere.

A live bar is only readable where the terminal redraws it; redirected to a
file (CI, SLURM, `| tee`) it would turn into control codes, so there the
console writes one line per logged step instead, in the same words the bar
uses. Other ranks build a disabled console so the caller needs no rank checks.
"""

from __future__ import annotations

import math
from types import TracebackType
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table


def _number(value: Any, spec: str) -> str:
    return format(value, spec) if isinstance(value, int | float) else "-"


def step_line(record: dict) -> str:
    """`step    10  loss 2.3000  lr 1.00e-03  5,000 tok/s`: one logged training step."""
    return (f"step {record['step']:>6}  loss {_number(record.get('loss'), '.4f')}  "
            f"lr {_number(record.get('lr'), '.2e')}  {_number(record.get('tokens_per_s'), ',.0f')} tok/s")


def eval_line(record: dict) -> str:
    """`eval at step 50: loss 2.5000  perplexity 12.18  best 2.4000  train 2.3000  gap +0.2000`: one evaluation."""
    best, gap = record.get("best_eval_loss"), record.get("train_val_gap")
    return (f"eval at step {record['step']}: loss {_number(record.get('eval_loss'), '.4f')}  "
            f"perplexity {_number(record.get('eval_perplexity'), '.2f')}"
            + (f"  best {_number(best, '.4f')}" if best is not None else "")
            + (f"  train {_number(record.get('train_loss'), '.4f')}  gap {_number(gap, '+.4f')}"
               if gap is not None else ""))


def event_line(record: dict) -> str:
    """`early stop at step 80: <reason>`: something that happened to the run."""
    reason = record.get("reason")
    return f"{str(record['event']).replace('_', ' ')} at step {record['step']}" + (f": {reason}" if reason else "")


class RunConsole:
    """Rank 0's view of a run; use as a context manager around training and call `log` from on_log.

    `console` defaults to rich's stdout console, which detects whether stdout is a
    terminal; pass one (e.g. writing to a StringIO) to choose. With `enabled=False`
    every method does nothing.
    """

    def __init__(self, total_steps: int, enabled: bool = True, console: Console | None = None,
                 start_step: int = 0) -> None:
        self.enabled = enabled
        self.console = console if console is not None else Console()
        self.live = enabled and self.console.is_terminal and not self.console.is_dumb_terminal
        self._total, self._start = total_steps, start_step
        self._progress: Progress | None = None
        self._task: TaskID | None = None

    def __enter__(self) -> RunConsole:
        if self.live:
            self._progress = Progress(
                MofNCompleteColumn(), BarColumn(), TextColumn("loss {task.fields[loss]}"),
                TextColumn("lr {task.fields[lr]}"), TextColumn("{task.fields[tps]} tok/s"),
                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                console=self.console)
            # Starting at the resumed step keeps the ETA to the steps still to run.
            self._task = self._progress.add_task("train", total=self._total, completed=self._start,
                                                 loss="-", lr="-", tps="-")
            self._progress.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def log(self, record: dict) -> None:
        """Show one on_log record: a training step moves the bar (or prints a line); an evaluation or event prints a line."""
        if not self.enabled:
            return
        if "event" in record:
            self.note(event_line(record))
        elif "eval_loss" in record:
            self.note(eval_line(record))
        elif "loss" in record:
            if self._progress is not None and self._task is not None:
                self._progress.update(self._task, completed=record["step"],
                                      loss=_number(record.get("loss"), ".4f"), lr=_number(record.get("lr"), ".2e"),
                                      tps=_number(record.get("tokens_per_s"), ",.0f"), refresh=True)
            else:
                self.note(step_line(record))

    def note(self, text: str) -> None:
        """Print a line of plain text; with a live bar it appears above the bar."""
        if self.enabled:
            self.console.print(text, markup=False, highlight=False, soft_wrap=True)

    def expert_table(self, usage: Any) -> None:
        """The MoE expert-utilisation table (an `ExpertUsageReport`): how evenly each layer used its experts."""
        if not self.enabled:
            return
        from ava.train.report.expert_usage import TABLE_HEADER

        table = Table(title=f"expert utilisation (from {usage.steps} logged steps)")
        for column in TABLE_HEADER:
            table.add_column(column, justify="right")
        for row in usage.table_rows():
            table.add_row(*row)
        self.console.print(table)

    def warn(self, text: str) -> None:
        """A warning the user must not miss: bold on a terminal, prefixed `WARNING:` everywhere."""
        if self.enabled:
            self.console.print(f"WARNING: {text}", style="bold red", markup=False, highlight=False, soft_wrap=True)

    def final_table(self, summary: dict) -> None:
        """Print the end-of-run table from the run's summary; keys that are absent or None are left out.

        Keys read: status, steps, step_range, first_loss, final_loss, best_loss, eval_loss, eval_perplexity,
        tokens, seconds, first_step_seconds, tokens_per_s, memory/* (GB), output_dir.
        """
        if not self.enabled:
            return
        table = Table(title="run summary", show_header=False)
        table.add_column("", style="bold")
        table.add_column("", justify="right")
        for label, value in summary_rows(summary):
            table.add_row(label, value)
        self.console.print(table)
        rows = health_rows(summary.get("gradient_health"))
        if rows:
            health = Table(title="gradient-health interventions")
            for column in ("event", "count", "steps"):
                health.add_column(column, justify="left" if column != "count" else "right")
            for row in rows:
                health.add_row(*row)
            self.console.print(health)


_ROWS: list[tuple[str, str, str]] = [
    ("status", "status", ""), ("steps", "steps", ",.0f"), ("first_loss", "first loss", ".4f"),
    ("final_loss", "final loss", ".4f"), ("best_loss", "best loss", ".4f"), ("eval_loss", "eval loss", ".4f"),
    ("eval_perplexity", "eval perplexity", ".2f"), ("best_eval_loss", "best eval loss", ".4f"),
    ("tokens", "tokens", ",.0f"), ("seconds", "wall time", "time"), ("first_step_seconds", "time to first step", "time"),
    ("tokens_per_s", "tokens/s", ",.0f"),
]
_MEMORY_LABELS = {"memory/peak_allocated_gb": "peak GPU memory allocated", "memory/peak_reserved_gb":
                  "peak GPU memory reserved", "memory/max_rss_gb": "peak host memory (max RSS)"}


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def summary_rows(summary: dict) -> list[tuple[str, str]]:
    """(label, formatted value) for the end-of-run table, in a fixed order."""
    rows = []
    if summary.get("eval_perplexity") is None and isinstance(summary.get("eval_loss"), int | float):
        summary = {**summary, "eval_perplexity": math.exp(min(summary["eval_loss"], 50))}  # as the loop computes it
    for key, label, spec in _ROWS:
        value = summary.get(key)
        if value is None:
            continue
        if spec == "time" and isinstance(value, int | float):
            rows.append((label, _duration(value)))
        elif spec and isinstance(value, int | float):
            rows.append((label, format(value, spec) + _qualifier(key, summary)))
        else:
            rows.append((label, str(value)))
        covered = summary.get("step_range")
        if key == "steps" and isinstance(covered, dict) and covered.get("text"):
            rows.append(("steps covered", str(covered["text"])))
    for key, value in summary.items():
        if key.startswith("memory/") and isinstance(value, int | float):
            rows.append((_MEMORY_LABELS.get(key, key), f"{value:.2f} GB"))
    precision = summary.get("precision")
    if isinstance(precision, dict) and precision.get("precision"):
        rows.append(("precision", precision_label(precision)))
    health = summary.get("gradient_health")
    if isinstance(health, dict):
        skipped = health.get("counts", {}).get("skipped_steps", 0)
        rows.append(("gradient health", f"{skipped} step(s) skipped, {health.get('rollbacks', 0)} rollback(s)"
                     if skipped or health.get("rollbacks") else "no intervention"))
    if isinstance(summary.get("checks_passed"), bool):
        rows.append(("run checks", "passed" if summary["checks_passed"] else "FAILED"))
    if summary.get("output_dir") is not None:
        rows.append(("outputs", str(summary["output_dir"])))
    return rows


def precision_label(precision: dict) -> str:
    """`fp8 rowwise (torchao, emulated)`, or just `bf16`."""
    label = str(precision["precision"])
    if precision.get("recipe"):
        label += f" {precision['recipe']}"
    details = [d for d in (precision.get("backend"), "emulated" if precision.get("emulated") else None) if d]
    return label + (f" ({', '.join(details)})" if details else "")


_HEALTH_LABELS = {"nonfinite_gradient": "NaN/Inf: update skipped", "gradient_explosion": "explosion: update skipped",
                  "lr_reduced": "learning rate reduced", "lr_restored": "learning rate restored",
                  "rollback": "rolled back to a checkpoint"}


def health_rows(health: dict | None) -> list[tuple[str, str, str]]:
    """(event, count, steps) for every kind of gradient-health intervention that happened."""
    if not isinstance(health, dict):
        return []
    rows = []
    for kind, steps in health.get("steps", {}).items():
        shown = ", ".join(map(str, steps[:10])) + (f", ... ({len(steps) - 10} more)" if len(steps) > 10 else "")
        rows.append((_HEALTH_LABELS.get(kind, kind.replace("_", " ")), str(len(steps)), shown))
    return rows


def _qualifier(key: str, summary: dict) -> str:
    """` of 100` after steps when fewer ran than planned; ` (step 80)` after the best eval loss; after a resume,
    the steps the first loss and the tokens come from (this process's, not the run's before the checkpoint)."""
    planned, best_step = summary.get("planned_steps"), summary.get("best_step")
    covered = summary.get("step_range")
    if key == "steps" and isinstance(planned, int) and planned != summary["steps"]:
        return f" of {planned:,}"
    if key == "best_eval_loss" and best_step is not None:
        return f" (step {best_step})"
    if isinstance(covered, dict) and covered.get("resumed_from") and covered["last"] >= covered["first"]:
        if key == "first_loss":
            return f" (step {covered['first']:,})"
        if key in ("tokens", "tokens_per_s"):
            return f" (steps {covered['first']:,}-{covered['last']:,})"
    return ""
