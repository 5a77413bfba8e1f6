"""What the cross-key checks read (the validated sections, every key's origin) and where they write.

Its own module so that each rule module (`feature_checks`, `lora_checks`,
`rlhf_checks`, ...) imports it from here, and `ava.config.checks`, which
composes those rules, is imported by none of them: the checks form a tree,
not a cycle.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from ava.config.batch import BatchPlan, WorldSize
from ava.config.errors import Notice, Problem
from ava.config.provenance import DEFAULT_ORIGIN, Origin
from ava.config.yaml_loader import KeyPath


@dataclass
class CheckContext:
    """What the checks read and where they write."""

    sections: Mapping[str, object]
    origins: dict[KeyPath, Origin]
    world: WorldSize
    problems: list[Problem] = field(default_factory=list)
    notices: list[Notice] = field(default_factory=list)
    batch: BatchPlan | None = None

    def origin(self, dotted: str) -> Origin:
        return self.origins.get(tuple(dotted.split(".")), DEFAULT_ORIGIN)

    def where(self, dotted: str) -> str:
        return self.origin(dotted).where()

    def key(self, dotted: str) -> str:
        return self.origin(dotted).key or dotted

    def problem(self, dotted: str, message: str, fix: str, value: object) -> None:
        self.problems.append(Problem(self.where(dotted), self.key(dotted), message, fix, value))
