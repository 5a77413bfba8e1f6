"""What an RLHF run prints: one line per logged step or evaluation, and the end-of-run reward table."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from ava.train.report.console import event_line

# (key, label, format) shown for a step record, in this order, when present.
_STEP_FIELDS: list[tuple[str, str, str]] = [
    ("loss", "loss", ".4f"), ("accuracy", "acc", ".3f"), ("margin", "margin", ".3f"),
    ("reward_margin", "reward margin", ".3f"), ("logp_margin", "logp margin", ".3f"),
    ("reward", "reward", ".3f"), ("reward_std", "±", ".3f"), ("kl", "kl", ".4f"), ("entropy", "entropy", ".3f"),
    ("policy_loss", "pg", ".4f"), ("value_loss", "vf", ".4f"), ("clip_fraction", "clip", ".3f"),
    ("approx_kl", "approx_kl", ".2e"), ("response_length", "len", ".1f"), ("kl_coef", "kl_coef", ".3g"),
    ("lr", "lr", ".2e"), ("generation_share", "gen", ".0%"),
]
_EVAL_FIELDS: list[tuple[str, str, str]] = [
    ("eval_loss", "loss", ".4f"), ("eval_accuracy", "accuracy", ".3f"), ("eval_margin", "margin", ".3f"),
    ("eval_logp_margin", "logp margin", ".3f"), ("eval_reward", "reward", ".3f"), ("eval_exact", "exact", ".2f"),
    ("eval_response_length", "len", ".1f"),
]


def _fields(record: dict, fields: list[tuple[str, str, str]]) -> str:
    parts = []
    for key, label, spec in fields:
        value = record.get(key)
        if isinstance(value, int | float):
            parts.append(f"{label} {format(value, spec)}" if label != "±" else f"±{format(value, spec)}")
    return "  ".join(parts).replace("  ±", "±")


def record_line(record: dict, planned: dict[str, int]) -> str | None:
    """The console line for one metrics record (None: nothing to show)."""
    stage = record.get("stage", "")
    if "event" in record:
        where = f" ({record['role']} update {record['update']})" if "update" in record else ""
        return f"{stage}: {event_line(record)}{where}"
    if any(k.startswith("eval_") for k in record):
        return f"{stage} eval at step {record['step']}: {_fields(record, _EVAL_FIELDS)}"
    total = planned.get(stage)
    return f"{stage} step {record['step']}{f'/{total}' if total else ''}  {_fields(record, _STEP_FIELDS)}"


class RLHFConsole:
    """Rank 0's console; other ranks build it disabled."""

    def __init__(self, planned: dict[str, int], enabled: bool, console: Console | None = None) -> None:
        self.planned, self.enabled = planned, enabled
        if console is None:
            console = Console()
            if not console.is_terminal:  # a log file: wide enough that the summary table never wraps
                console = Console(width=120)
        self.console = console

    def log(self, record: dict) -> None:
        line = record_line(record, self.planned) if self.enabled else None
        if line:
            self.note(line)

    def note(self, text: str) -> None:
        if self.enabled:
            self.console.print(text, markup=False, highlight=False, soft_wrap=True)

    def final_table(self, stages: list[dict[str, Any]]) -> None:
        """One row per stage: what it is judged by, at its start and its end."""
        if not self.enabled:
            return
        table = Table(title="RLHF summary")
        for column in ("stage", "status", "steps", "measure", "start", "end", "time"):
            table.add_column(column, justify="left" if column in ("stage", "status", "measure") else "right")
        for s in stages:
            for measure, start, end in summary_rows(s):
                table.add_row(s["stage"], s["status"], str(s.get("steps", "")), measure, start, end,
                              f"{s.get('seconds', 0):.0f} s")
        self.console.print(table)


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, int | float) else "-"


def summary_rows(stage: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(measure, start, end) rows for a stage's summary: the numbers that say whether it worked."""
    s = stage.get("summary", {})
    rows = []
    if "first_loss" in s:
        rows.append(("train loss", _fmt(s["first_loss"]), _fmt(s["final_loss"])))
    if "reward_first_10pct" in s:
        rows.append(("rollout reward, first -> last 10%", _fmt(s["reward_first_10pct"]),
                     _fmt(s["reward_last_10pct"])))
    for key, label in (("eval_reward", "held-out greedy reward"), ("eval_accuracy", "held-out pair accuracy"),
                       ("eval_logp_margin", "held-out chosen-rejected log-prob margin"),
                       ("eval_loss", "held-out loss")):
        if f"before/{key}" in s or f"after/{key}" in s:
            rows.append((label, _fmt(s.get(f"before/{key}")), _fmt(s.get(f"after/{key}"))))
    return rows or [("-", "-", "-")]
