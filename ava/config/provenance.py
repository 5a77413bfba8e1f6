"""Where each resolved value came from.

Layers are ordered by precedence; an `Origin` records the layer, the file and
line (or command-line flag) and the key as the user wrote it, which matters
when the value arrived through an alias such as `deepspeed.micro_batch_size`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Any


class Layer(IntEnum):
    """Configuration layers, lowest precedence first."""

    DEFAULT = 0
    BASE = 1
    HARDWARE = 2
    DISTRIBUTED = 3
    RLHF = 4
    CLI = 5
    DERIVED = 6  # computed by Ava (e.g. the batch solver); always shown as such

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclass(frozen=True)
class Origin:
    """The source of one value."""

    layer: Layer
    file: str | None = None
    line: int | None = None
    key: str = ""  # the key as written at the source (may be an alias)
    detail: str = ""  # free text: the CLI flag, or how a derived value was computed

    def where(self) -> str:
        """Short location: `file:line`, `command line (--flag)`, `default`, `derived`."""
        if self.file is not None:
            return f"{self.file}:{self.line}" if self.line else self.file
        if self.layer is Layer.CLI:
            return f"command line ({self.detail})" if self.detail else "command line"
        if self.layer is Layer.DERIVED:
            return "derived"
        return "default"

    def describe(self) -> str:
        """Location plus alias and derivation detail, for `config explain`."""
        text = self.where()
        if self.layer is Layer.DERIVED and self.detail:
            text = f"derived: {self.detail}"
        return text


DEFAULT_ORIGIN = Origin(Layer.DEFAULT)


@dataclass(frozen=True)
class Assignment:
    """One layer setting one key: the history `config explain` prints."""

    value: Any
    origin: Origin
    reset: bool = False  # an explicit `null`, which resets the key to its default
