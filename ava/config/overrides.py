"""Command-line overrides: `--batch_size 32`, `--training.learning_rate=5e-5`, `--deepspeed.cpu_offload`.

Values are parsed by the type of the key they target: numbers (including
`5e-5`), booleans and lists with the same YAML rules as config files, text
kept verbatim for string keys, and `null` resets a key to its default.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ava.config import keys
from ava.config.aliases import alias_of
from ava.config.errors import Problem
from ava.config.merge import Leaf
from ava.config.provenance import Layer, Origin
from ava.config.yaml_loader import parse_scalar

_NULLS = {"null", "none", "~"}


@dataclass(frozen=True)
class RawOverride:
    """One `--name value` pair as typed."""

    name: str
    value: str | None  # None when the flag had no value
    text: str  # for messages, e.g. "--batch_size 32"


def split_overrides(argv: Sequence[str]) -> tuple[list[RawOverride], list[Problem]]:
    """Pair up `--name value` / `--name=value` tokens."""
    out: list[RawOverride] = []
    problems: list[Problem] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        if not token.startswith("--") or token == "--":
            problems.append(Problem(
                "command line", "", f"unexpected argument {token!r}",
                "overrides are written `--key value` or `--section.key=value`, e.g. `--batch_size 32`"))
            i += 1
            continue
        body = token[2:]
        if "=" in body:
            name, value = body.split("=", 1)
            out.append(RawOverride(name, value, token))
            i += 1
        elif i + 1 < len(argv) and not _looks_like_flag(argv[i + 1]):
            out.append(RawOverride(body, argv[i + 1], f"{token} {argv[i + 1]}"))
            i += 2
        else:
            out.append(RawOverride(body, None, token))
            i += 1
    return out, problems


def _looks_like_flag(token: str) -> bool:
    return token.startswith("--") and len(token) > 2 and not token[2].isdigit()


def resolve_overrides(raw: Sequence[RawOverride]) -> tuple[list[Leaf], list[Problem]]:
    """Map each override to exactly one schema key and parse its value."""
    leaves: list[Leaf] = []
    problems: list[Problem] = []
    for item in raw:
        where = f"command line ({item.text})"
        path, problem = _target(item.name, where)
        if problem:
            problems.append(problem)
            continue
        assert path is not None
        info = keys.lookup(path)
        assert info is not None
        if item.value is None:
            if info.is_bool():
                value: object = True
            else:
                problems.append(Problem(where, info.dotted, "the flag has no value",
                                        f"write `--{item.name} VALUE` ({info.type_name()})"))
                continue
        elif item.value.strip().lower() in _NULLS:
            value = None
        elif info.is_bool() and item.value.strip() in ("1", "0"):
            value = item.value.strip() == "1"
        elif info.takes_raw_string():
            value = item.value
        else:
            value = parse_scalar(item.value)
        origin = Origin(Layer.CLI, key=info.dotted, detail=item.text)
        leaves.append(Leaf(path, value, origin))
    return leaves, problems


def _target(name: str, where: str) -> tuple[keys.KeyPath | None, Problem | None]:
    if "." in name:
        path = tuple(name.split("."))
        if keys.lookup(path):
            return path, None
        if keys.is_section(path):
            sub = keys.children(path)
            return None, Problem(where, name, f"'{name}' is a section, not a single value",
                                 f"set one of its keys, e.g. --{name}.{sub[0]} VALUE" if sub else "")
        return None, _unknown_dotted(path, where)
    # alternative names of one setting (see aliases.py) are not an ambiguity
    matches = tuple(dict.fromkeys(alias_of(p) or p for p in keys.flat_names().get(name, ())))
    if len(matches) == 1:
        return matches[0], None
    if len(matches) > 1:
        written = keys.flat_names()[name]
        listed = " and ".join(f"--{'.'.join(p)} ({_meaning(p)})" for p in written)
        return None, Problem(where, name, f"the flat flag --{name} is ambiguous: it could mean {listed}",
                             "use the dotted form of the one you mean: "
                             + " or ".join("--" + ".".join(p) for p in written))
    if keys.is_section((name,)):
        return None, Problem(where, name, f"'{name}' is a section, not a single value",
                             f"set one of its keys, e.g. --{name}.{keys.children((name,))[0]} VALUE")
    nested = keys.other_sections_with(name, exclude=())
    close = keys.suggest(name, list(keys.flat_names()))
    if nested:
        also = (" (or did you mean " + " or ".join("--" + c for c in close) + "?)") if close else ""
        return None, Problem(where, name, f"there is no top-level setting '{name}'",
                             "use the full dotted name: " + " or ".join("--" + n for n in nested) + also)
    fix = ("did you mean " + " or ".join("--" + c for c in close) + "?") if close else \
        "run `ava config show --config FILE` to list the keys, or use the dotted form --section.key"
    return None, Problem(where, name, f"unknown option --{name}", fix)


def _meaning(path: keys.KeyPath) -> str:
    info = keys.lookup(path)
    return (info.description.rstrip(".") if info and info.description else "a setting")


def _unknown_dotted(path: keys.KeyPath, where: str) -> Problem:
    dotted = ".".join(path)
    # find the deepest valid prefix to suggest from
    for cut in range(len(path) - 1, -1, -1):
        prefix = path[:cut]
        if keys.is_section(prefix):
            options = keys.children(prefix)
            bad = path[cut]
            close = keys.suggest(bad, options)
            if close:
                fix = "did you mean " + " or ".join(
                    "--" + ".".join((*prefix, c, *path[cut + 1:])) for c in close) + "?"
            else:
                elsewhere = keys.other_sections_with(bad, exclude=prefix)
                fix = ("it lives at " + " or ".join("--" + e for e in elsewhere)) if elsewhere else \
                    f"valid keys under '{'.'.join(prefix) or 'the top level'}': " + ", ".join(options)
            return Problem(where, dotted, f"unknown key '{bad}'"
                           + (f" in section '{'.'.join(prefix)}'" if prefix else ""), fix)
    return Problem(where, dotted, "unknown key", "")
