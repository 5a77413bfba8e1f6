"""Safe YAML loading with line numbers, YAML 1.2 floats and duplicate-key errors.

PyYAML implements YAML 1.1, whose float pattern needs a dot, so `5e-5` loads
as the string "5e-5" -- the single most common surprise with ML configs.  The
loader here adds the YAML 1.2 exponent form.  It only ever uses the safe
constructors: no tag can build a Python object or run code.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ava.config.errors import ConfigError, Problem


class _AvaLoader(yaml.SafeLoader):
    """SafeLoader with a private copy of the resolver table (never patch the global one)."""


_AvaLoader.yaml_implicit_resolvers = {
    first: list(resolvers) for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_FLOAT_WITH_EXPONENT = re.compile(
    r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"
)
_AvaLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_WITH_EXPONENT, list("-+0123456789."))

KeyPath = tuple[str, ...]
_MAP_TAG = "tag:yaml.org,2002:map"


@dataclass
class LoadedYaml:
    """A YAML mapping plus the line (1-based) of every key path in it."""

    path: str
    data: dict[str, Any]
    lines: dict[KeyPath, int] = field(default_factory=dict)


def parse_scalar(text: str) -> Any:
    """Parse one command-line value with the same rules as a YAML file."""
    try:
        return yaml.load(text, Loader=_AvaLoader)  # noqa: S506 - _AvaLoader is a SafeLoader
    except yaml.YAMLError:
        return text


def load_yaml_file(path: str | Path, *, role: str = "config", must_set: bool = False) -> LoadedYaml:
    """Load a YAML config file; every failure is a `ConfigError` naming the file and line.

    `must_set`: a file that sets nothing (empty, or only comments) is an error too.
    """
    shown = str(path)
    p = Path(path)
    if not p.exists():
        raise ConfigError([Problem(shown, "", f"the {role} file does not exist",
                                   _suggest_file(p))])
    if p.is_dir():
        raise ConfigError([Problem(shown, "", f"the {role} path is a directory, not a YAML file",
                                   "pass the path of a .yaml file inside it")])
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([Problem(shown, "", f"cannot read the {role} file ({exc})",
                                   "check the file's permissions and that it is UTF-8 text")]) from None
    loaded = load_yaml_text(text, shown)
    if must_set and not loaded.data:
        raise ConfigError([Problem(shown, "", f"the {role} file sets nothing (it is empty or holds only comments)",
                                   "put its sections in it (model:, training:, ...; see configs/gpu/tiny.yaml), "
                                   "or leave the file out of the command")])
    return loaded


def load_yaml_text(text: str, shown: str) -> LoadedYaml:
    """Parse YAML text; `shown` is the name used in messages."""
    loader = _AvaLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return LoadedYaml(shown, {})
        if not isinstance(node, yaml.MappingNode):
            raise ConfigError([Problem(
                f"{shown}:{node.start_mark.line + 1}", "",
                "the top level of a config file must be a mapping of sections "
                "(model:, training:, data:, deepspeed:, ...)",
                "start the file with a section name followed by a colon, e.g. `training:`")])
        result = LoadedYaml(shown, {})
        result.data = _build_mapping(loader, node, (), result)
        return result
    except yaml.MarkedYAMLError as exc:
        raise ConfigError([_syntax_problem(shown, text, exc)]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([Problem(shown, "", f"invalid YAML ({exc})",
                                   "check the file with a YAML linter")]) from None
    finally:
        loader.dispose()


def _build_mapping(loader: _AvaLoader, node: yaml.MappingNode, prefix: KeyPath,
                   out: LoadedYaml) -> dict[str, Any]:
    if node.tag != _MAP_TAG:  # built by hand below, so a tag on a section would otherwise be ignored silently
        raise ConfigError([_tag_problem(f"{out.path}:{node.start_mark.line + 1}", ".".join(prefix), node.tag)])
    own = {id(k) for k, _ in node.value}
    loader.flatten_mapping(node)  # expands `<<: *anchor` merge keys (merged pairs come first)
    mapping: dict[str, Any] = {}
    first_line: dict[str, int] = {}
    merged_keys: set[str] = set()
    for key_node, value_node in node.value:
        line = key_node.start_mark.line + 1
        key = _construct(loader, key_node, prefix, out)
        if id(key_node) not in own:
            merged_keys.add(key)
        elif key in merged_keys:
            merged_keys.discard(key)  # an explicit key overrides one brought in by `<<:`
            first_line.pop(key, None)
        if not isinstance(key, str):
            raise ConfigError([Problem(f"{out.path}:{line}", ".".join(prefix),
                                       f"key {key!r} is not a string",
                                       "config keys are names such as `hidden_size`")])
        if key in first_line:
            dotted = ".".join((*prefix, key))
            raise ConfigError([Problem(
                f"{out.path}:{line}", dotted,
                f"duplicate key: '{key}' is also set on line {first_line[key]} of the same mapping, "
                "and YAML would silently keep only the last one",
                "delete one of the two lines")])
        first_line[key] = line
        path = (*prefix, key)
        out.lines[path] = line
        if isinstance(value_node, yaml.MappingNode):
            mapping[key] = _build_mapping(loader, value_node, path, out)
        else:
            mapping[key] = _construct(loader, value_node, path, out)
    return mapping


def _construct(loader: _AvaLoader, node: yaml.Node, path: KeyPath, out: LoadedYaml) -> Any:
    """One value, built by the safe constructors; a tag they do not know is a user error naming the key."""
    try:
        return loader.construct_object(node, deep=True)
    except yaml.constructor.ConstructorError as exc:
        if exc.problem is None or "could not determine a constructor" not in exc.problem:
            raise
        mark = exc.problem_mark or node.start_mark
        tag = re.search(r"tag '([^']*)'", exc.problem)
        raise ConfigError([_tag_problem(f"{out.path}:{mark.line + 1}", ".".join(path),
                                        tag.group(1) if tag else node.tag)]) from None


def _tag_problem(where: str, dotted: str, tag: str) -> Problem:
    """A YAML tag (`!!python/object/apply:...`, `!custom`) that the safe loader refuses to build."""
    shown = tag.replace("tag:yaml.org,2002:", "!!")
    return Problem(where, dotted,
                   f"the YAML tag `{shown}` is not allowed: config files are data, so Ava builds only plain "
                   "values from them (numbers, strings, true/false, null, lists, mappings), never a Python "
                   "object or a function call",
                   f"delete `{shown}` and write the plain value")


def _syntax_problem(shown: str, text: str, exc: yaml.MarkedYAMLError) -> Problem:
    mark = exc.problem_mark or exc.context_mark
    where = f"{shown}:{mark.line + 1}:{mark.column + 1}" if mark else shown
    reason = " ".join(filter(None, [exc.context, exc.problem])) or "invalid YAML"
    line_text = ""
    if mark is not None:
        lines = text.splitlines()
        if 0 <= mark.line < len(lines):
            line_text = lines[mark.line]
    if "\t" in line_text or "'\\t'" in reason:
        fix = "YAML indentation must use spaces, not tabs: replace the tab characters on that line with spaces"
    elif "mapping values are not allowed" in reason:
        fix = "a value containing ': ' must be quoted, or a key is indented under a scalar; check the indentation"
    elif "expected <block end>" in reason or "did not find expected key" in reason:
        fix = "the indentation of this line does not match its siblings; align it with the other keys of its section"
    else:
        fix = "correct the YAML syntax at that position (missing colon, unbalanced quotes or brackets, bad indentation)"
    return Problem(where, "", f"YAML syntax error: {reason}"
                   + (f" in line `{line_text.strip()}`" if line_text.strip() else ""), fix)


def _suggest_file(p: Path) -> str:
    parent = p.parent if str(p.parent) else Path(".")
    if parent.is_dir():
        import difflib

        names = sorted(x.name for x in parent.iterdir() if x.suffix in (".yaml", ".yml"))
        close = difflib.get_close_matches(p.name, names, n=3, cutoff=0.5)
        if close:
            return "did you mean " + " or ".join(str(parent / c) for c in close) + "?"
        if names:
            return f"files available in {parent}: " + ", ".join(names[:12])
    return "check the path (it is resolved relative to the current directory)"
