"""Turn the merged tree into validated sections, translating pydantic errors.

Each section is validated on its own so that a typo in `model:` does not hide
a wrong type in `training:`: every problem in every section is reported in
one go, located at the file and line where the user wrote the key.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

from pydantic import BaseModel, ValidationError

from ava.config import keys
from ava.config.errors import Notice, Problem, format_value
from ava.config.merge import MergedTree
from ava.config.provenance import Origin
from ava.config.schema import SECTIONS, compatibility_warnings
from ava.config.schema.base import INT64_MAX
from ava.config.yaml_loader import KeyPath, parse_scalar


def validate_sections(tree: MergedTree) -> tuple[dict[str, BaseModel | None], list[Problem], list[Notice]]:
    """Validate every section present; return the valid ones plus all problems and notices."""
    problems: list[Problem] = []
    valid: dict[str, BaseModel | None] = {}

    for name in tree.data:
        if name not in SECTIONS:
            problems.append(_unknown_key((name,), tree))

    for name, model in SECTIONS.items():
        raw = tree.data.get(name)
        if raw is None:
            valid[name] = None if name == "rlhf" else model()
            continue
        if not isinstance(raw, dict):
            problems.append(Problem(_where(tree, (name,)), name, f"'{name}' must be a mapping of keys",
                                    f"write `{name}:` followed by indented `key: value` lines", raw))
            continue
        try:
            valid[name] = model.model_validate(raw)
        except ValidationError as exc:
            problems.extend(_convert(name, err, tree) for err in exc.errors())

    # keys accepted for compatibility only (ava.config.schema.compatibility): a value other than the default warns
    notices = [Notice("warning", _where(tree, tuple(key.split("."))), key,
                      f"{format_value(value)} has no effect: {why}")
               for key, value, why in compatibility_warnings(valid)]
    return valid, problems, notices


def _where(tree: MergedTree, path: KeyPath) -> str:
    origin = _origin(tree, path)
    return origin.where() if origin else "defaults"


def _origin(tree: MergedTree, path: KeyPath) -> Origin | None:
    for cut in range(len(path), 0, -1):
        origin = tree.locations.get(path[:cut])
        if origin is not None:
            return origin
    return None


def _shown_key(tree: MergedTree, path: KeyPath) -> str:
    origin = tree.origins.get(path)
    return origin.key if origin and origin.key else ".".join(path)


def _unknown_key(path: KeyPath, tree: MergedTree) -> Problem:
    parent, bad = path[:-1], path[-1]
    where = _where(tree, path)
    dotted = ".".join(path)
    options = keys.children(parent)
    close = keys.suggest(bad, options)
    section = ".".join(parent) or "the top level"
    if close:
        fix = "did you mean " + " or ".join(f"'{c}'" for c in close) + "?"
    else:
        elsewhere = keys.other_sections_with(bad, exclude=parent)
        if elsewhere:
            fix = f"'{bad}' belongs under " + " or ".join(e.rsplit(".", 1)[0] + ":" for e in elsewhere) \
                + f" (full key {' or '.join(elsewhere)}); move it there"
        else:
            fix = f"remove it; the keys allowed in {section} are: " + ", ".join(options)
    kind = "section" if not parent else "key"
    return Problem(where, dotted, f"unknown {kind} '{bad}' in {section}", fix)


def _convert(section: str, err: Any, tree: MergedTree) -> Problem:
    loc = (section, *[str(part) for part in err["loc"]])
    path = tuple(p for p in loc if not p.isdigit())
    kind = err["type"]
    value = err.get("input")
    if kind == "extra_forbidden":
        problem = _unknown_key(path, tree)
        return replace(problem, key=_indexed(loc)) if len(loc) != len(path) else problem
    info = keys.lookup(path)
    where = _where(tree, path)
    key = _shown_key(tree, path) if len(loc) == len(path) else _indexed(loc)
    message = err["msg"]
    fix = ""
    numeric = kind in ("int_type", "float_type", "int_from_float", "finite_number", "int64_range", *_RANGE_ERRORS)
    accepted = _accepted_range(info, loc) if numeric else ""
    about = f": {info.description.rstrip('.')}" if info and info.description else ""
    if kind in ("int_type", "float_type", "int_from_float") and _spells_non_finite(value):
        # `nan` and `inf` are strings in YAML (its floats are spelt .nan and .inf), but what was meant is clear.
        message = f"{value} is not a valid number here: this key takes a finite number"
        fix = _choose(accepted, about)
    elif kind in ("int_type", "float_type", "bool_type", "int_from_float", "list_type", "string_type"):
        expected = {"int_type": "a whole number", "int_from_float": "a whole number",
                    "float_type": "a number", "bool_type": "true or false",
                    "list_type": "a list such as [0.9, 0.95]", "string_type": "text"}[kind]
        message = f"expected {expected}, got {type(value).__name__}"
        if isinstance(value, str) and kind != "string_type" and not isinstance(parse_scalar(value), str):
            fix = f"remove the quotes: write {value}"
        elif kind == "bool_type":
            fix = "write true or false (without quotes)"
        else:
            fix = f"give {expected}" + (f" {accepted}" if accepted else "") \
                + (f" ({info.description.rstrip('.')})" if info and info.description else "")
    elif kind == "finite_number":
        message = f"must be a finite number, not {format_value(value)}"
        fix = _choose(accepted, about)
    elif kind == "int64_range":
        message = "is beyond the 64-bit integers every count and size must fit in"
        fix = _choose(accepted or f"at most {_number(INT64_MAX)}", about)
    elif kind == "literal_error" and info is not None and info.allowed() is not None:
        allowed = info.allowed() or ()
        message = f"not an allowed value; allowed: {', '.join(repr(a) for a in allowed)}"
        close = keys.suggest(str(value), [str(a) for a in allowed])
        fix = (f"did you mean '{close[0]}'?" if close else f"use one of {', '.join(repr(a) for a in allowed)}")
    elif kind in _RANGE_ERRORS:
        limit = (err.get("ctx") or {}).get(_RANGE_ERRORS[kind])
        message = (f"must be {_RANGE_WORDS[kind]} {_number(limit)}" if limit is not None
                   else message.replace("Input should be", "must be"))
        fix = _choose(accepted, about)
    elif kind in ("too_short", "too_long"):
        message = f"must have exactly {_length(info)} values"
        fix = "write e.g. [0.9, 0.95]" if path[-1] == "betas" else "give the right number of values"
    elif kind in ("model_type", "dict_type", "model_attributes_type"):
        message = f"'{path[-1]}' must be a mapping of keys"
        fix = f"write `{path[-1]}:` followed by indented key: value lines; keys: {', '.join(keys.children(path))}"
    elif kind == "string_pattern_mismatch":
        fix = "write it as `module:function`, e.g. `my_rewards:exact_match` (a file my_rewards.py in the working directory)"
    else:
        fix = info.description if info and info.description else ""
    return Problem(where, key, message, fix, value)


def _indexed(loc: tuple[str, ...]) -> str:
    """A key inside a list shown with its item's index: data.sources[1].weight."""
    out = ""
    for part in loc:
        out += f"[{part}]" if part.isdigit() else (f".{part}" if out else part)
    return out


def _length(info: keys.KeyInfo | None) -> int:
    if info is None:
        return 2
    for meta in info.field.metadata:
        if hasattr(meta, "min_length") and meta.min_length is not None:
            return int(meta.min_length)
    return 2


# pydantic's range error kinds -> the constraint each reports, and how a message says it.
_RANGE_ERRORS = {"greater_than": "gt", "greater_than_equal": "ge", "less_than": "lt", "less_than_equal": "le"}
_RANGE_WORDS = {"greater_than": "greater than", "greater_than_equal": "at least", "less_than": "less than",
                "less_than_equal": "at most"}


def _choose(accepted: str, about: str) -> str:
    """The fix of a number out of range: the range, then what the key is."""
    return f"choose a value {accepted or 'in range'}{about}"


def _spells_non_finite(value: Any) -> bool:
    """`nan`, `inf`, `-Infinity`...: text that names a number that is not finite."""
    if not isinstance(value, str):
        return False
    try:
        return not math.isfinite(float(value))
    except ValueError:
        return False


def _accepted_range(info: keys.KeyInfo | None, loc: tuple[str, ...]) -> str:
    """The values a numeric key accepts, from its constraints: "from 1 to 2^53 (9,007,199,254,740,992)"."""
    if info is None:
        return ""
    bounds = info.bounds(item=loc[-1].isdigit())
    if info.is_int():  # whole numbers: "greater than 0" is "from 1"
        if "gt" in bounds:
            bounds["ge"] = bounds.pop("gt") + 1
        if "lt" in bounds:
            bounds["le"] = bounds.pop("lt") - 1
        bounds.setdefault("le", INT64_MAX)  # the catch-all bound of every integer (ava.config.schema.base)
    if "ge" in bounds and "le" in bounds:
        return f"from {_number(bounds['ge'])} to {_number(bounds['le'])}"
    low = (f"at least {_number(bounds['ge'])}" if "ge" in bounds else
           f"greater than {_number(bounds['gt'])}" if "gt" in bounds else "")
    high = (f"at most {_number(bounds['le'])}" if "le" in bounds else
            f"less than {_number(bounds['lt'])}" if "lt" in bounds else "")
    return " and ".join(part for part in (low, high) if part)


def _number(value: Any) -> str:
    """A bound as a user reads it: 16,384; 2^53 (9,007,199,254,740,992); 2^63 - 1; 1e6; 0.5."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**63:
        whole = int(value)
        digits = str(abs(whole))
        if whole >= 10**6 and digits.rstrip("0") == "1":
            return f"1e{len(digits) - 1}"
        value = whole
    if isinstance(value, int) and not isinstance(value, bool):
        if value == INT64_MAX:
            return "2^63 - 1"
        if value >= 2**16 and value & (value - 1) == 0:
            return f"2^{value.bit_length() - 1} ({value:,})"
        if value >= 2**16 and (value + 1) & value == 0:
            return f"2^{value.bit_length()} - 1 ({value:,})"
        return f"{value:,}"
    return repr(value) if isinstance(value, float) else str(value)
