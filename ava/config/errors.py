"""Typed configuration errors.

Every user mistake becomes a `Problem`: where it is (file:line or the command
line), which key, the offending value, why it is wrong and how to fix it.  All
problems found in one pass are raised together in one `ConfigError`, so a user
fixes a config in one round trip instead of one error per run.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ava.errors import UserError

_MISSING = object()


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a configuration."""

    where: str  # "configs/gpu/base.yaml:14", "command line (--batch_size)", "defaults"
    key: str  # dotted key path, e.g. "model.hidden_size"; "" for a whole file
    message: str  # why it is wrong
    fix: str = ""  # what to do about it
    value: Any = _MISSING  # the offending value, when there is one

    def render(self) -> str:
        head = f"{self.where}: " if self.where else ""
        if self.key:
            head += self.key
            if self.value is not _MISSING:
                head += f" = {format_value(self.value)}"
            head += ": "
        text = head + _sentence(self.message)
        if self.fix:
            text += " Fix: " + _sentence(self.fix)
        return text


def _sentence(text: str) -> str:
    text = text.rstrip().rstrip(".")
    return text if text.endswith(("?", "!")) else text + "."


def format_value(value: Any) -> str:
    """Short, YAML-like rendering of a value for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, float) and not math.isfinite(value):  # as YAML spells them
        return ".nan" if math.isnan(value) else (".inf" if value > 0 else "-.inf")
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class ConfigError(UserError):
    """A configuration that cannot be used, with every problem found (each with its own fix)."""

    def __init__(self, problems: Sequence[Problem]):
        self.problems = list(problems)
        Exception.__init__(self, self.render())
        self.message, self.fix = self.render(), ""

    def render(self) -> str:
        n = len(self.problems)
        lines = [f"configuration error: {n} problem{'s' if n != 1 else ''} found"]
        for i, problem in enumerate(self.problems, 1):
            lines.append(f"  {i}. {problem.render()}")
        return "\n".join(lines)


@dataclass(frozen=True)
class Notice:
    """Something the user should know that does not stop the run (a warning or a note)."""

    level: str  # "warning" | "note"
    where: str
    key: str
    message: str

    def render(self) -> str:
        loc = f"{self.where}: " if self.where else ""
        key = f"{self.key}: " if self.key else ""
        return f"{self.level}: {loc}{key}{self.message}"
