"""Introspection of the schema: which key paths exist, their types and help.

One place answers "is `training.lr` a key?", "what does `--batch_size` mean?"
and "did you mean ...?", so the CLI, validation messages and `config explain`
always agree with the schema.
"""

from __future__ import annotations

import difflib
import types
import typing
from dataclasses import dataclass
from functools import cache
from typing import Any, Literal, Union

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from ava.config.schema import AvaConfig

KeyPath = tuple[str, ...]


@dataclass(frozen=True)
class KeyInfo:
    """A leaf key of the schema."""

    path: KeyPath
    field: FieldInfo

    @property
    def dotted(self) -> str:
        return ".".join(self.path)

    @property
    def annotation(self) -> Any:
        return self.field.annotation

    @property
    def description(self) -> str:
        return self.field.description or ""

    def default(self) -> Any:
        return self.field.get_default(call_default_factory=True)

    def allowed(self) -> tuple[Any, ...] | None:
        """The allowed values of a Literal-typed key, else None."""
        for arg in _flatten(self.annotation):
            if typing.get_origin(arg) is Literal:
                return typing.get_args(arg)
        return None

    def takes_raw_string(self) -> bool:
        """True when the command-line text should be kept verbatim (str-typed keys)."""
        args = [a for a in _flatten(self.annotation) if a is not type(None)]
        return bool(args) and all(
            a is str or (typing.get_origin(a) is Literal and all(isinstance(v, str) for v in typing.get_args(a)))
            for a in args)

    def is_bool(self) -> bool:
        return any(a is bool for a in _flatten(self.annotation))

    def is_int(self) -> bool:
        return any(a is int for a in _flatten(self.annotation))

    def bounds(self, item: bool = False) -> dict[str, Any]:
        """The key's numeric constraints by name (ge, gt, le, lt), or (`item`) those of each value of a list key."""
        metadata: list[Any] = list(self.field.metadata) if not item else []
        for arg in _flatten(self.annotation) if item else ():
            element = typing.get_args(arg)[0] if typing.get_origin(arg) is list else None
            if typing.get_origin(element) is typing.Annotated:
                for meta in typing.get_args(element)[1:]:
                    metadata.extend(meta.metadata if isinstance(meta, FieldInfo) else [meta])
        return {name: getattr(meta, name) for meta in metadata for name in ("ge", "gt", "le", "lt")
                if getattr(meta, name, None) is not None}

    def type_name(self) -> str:
        names = []
        for a in _flatten(self.annotation):
            if a is type(None):
                names.append("null")
            elif typing.get_origin(a) is Literal:
                names.append(" | ".join(repr(v) for v in typing.get_args(a)))
            elif typing.get_origin(a) is list:
                names.append("list")
            else:
                names.append(getattr(a, "__name__", str(a)))
        return " | ".join(names)


def _flatten(annotation: Any) -> list[Any]:
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        out: list[Any] = []
        for arg in typing.get_args(annotation):
            out.extend(_flatten(arg))
        return out
    if origin is typing.Annotated:
        return _flatten(typing.get_args(annotation)[0])
    return [annotation]


def _section_model(annotation: Any) -> type[BaseModel] | None:
    for arg in _flatten(annotation):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


@cache
def _index() -> tuple[dict[KeyPath, KeyInfo], dict[KeyPath, type[BaseModel]]]:
    leaves: dict[KeyPath, KeyInfo] = {}
    sections: dict[KeyPath, type[BaseModel]] = {(): AvaConfig}

    def walk(model: type[BaseModel], prefix: KeyPath) -> None:
        for name, info in model.model_fields.items():
            path = (*prefix, name)
            sub = _section_model(info.annotation)
            if sub is not None:
                sections[path] = sub
                walk(sub, path)
            else:
                leaves[path] = KeyInfo(path, info)

    walk(AvaConfig, ())
    return leaves, sections


def leaf_keys() -> dict[KeyPath, KeyInfo]:
    return _index()[0]


def section_keys() -> dict[KeyPath, type[BaseModel]]:
    return _index()[1]


def lookup(path: KeyPath) -> KeyInfo | None:
    info = leaf_keys().get(path)
    if info is None and len(path) > 1:  # a key inside an item of a list of sections (data.sources)
        item = _item_model(path[:-1])
        if item is not None and path[-1] in item.model_fields:
            return KeyInfo(path, item.model_fields[path[-1]])
    return info


def is_section(path: KeyPath) -> bool:
    return path in section_keys()


def children(path: KeyPath) -> list[str]:
    """Names allowed directly under a section path."""
    model = section_keys().get(path) or _item_model(path)
    return list(model.model_fields) if model else []


def _item_model(path: KeyPath) -> type[BaseModel] | None:
    """The model of each item of a list-of-sections key such as data.sources."""
    info = lookup(path)
    if info is None:
        return None
    for arg in _flatten(info.annotation):
        if typing.get_origin(arg) is list:
            return _section_model(typing.get_args(arg)[0])
    return None


@cache
def flat_names() -> dict[str, tuple[KeyPath, ...]]:
    """Flat command-line names (`--batch_size`) -> the section-level keys they may mean.

    Only direct keys of a section take part: `warmup_steps` means
    `training.warmup_steps`, never `training.gradient_health.warmup_steps`.
    """
    table: dict[str, list[KeyPath]] = {}
    for path in leaf_keys():
        if len(path) == 2:
            table.setdefault(path[1], []).append(path)
    return {name: tuple(paths) for name, paths in table.items()}


def suggest(name: str, options: list[str], n: int = 3) -> list[str]:
    """Close matches for a misspelt name."""
    return difflib.get_close_matches(name, options, n=n, cutoff=0.6)


def other_sections_with(name: str, exclude: KeyPath) -> list[str]:
    """Dotted keys elsewhere in the schema whose last part is `name`."""
    return [".".join(p) for p in list(leaf_keys()) + list(section_keys())
            if p and p[-1] == name and p[:-1] != exclude]
