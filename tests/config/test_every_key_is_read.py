"""No inert keys: every schema key is read by the code, or listed once as compatibility-only and warned about.

"Read by the code" means its name is used somewhere in ava/ outside
ava/config/schema/ as an attribute (`cfg.data.max_length`) or as a string
(`"max_length"`: aliases, DeepSpeed JSON, `getattr`), found by parsing the
source with `ast`, so a comment or a docstring that names a key does not
count. A schema property or method counts as reading the fields it uses when
the code reads the property (`model.moh_shared_heads` reads
`moh.num_shared_heads`). The check is by name: a key named like another key
that is read passes, so a new key should have a name of its own.

The compatibility list (`ava.config.schema.compatibility.COMPATIBILITY_ONLY`)
cannot go stale either way: a listed key that the code reads fails too.
"""

from __future__ import annotations

import ast
import types
import typing
from typing import Any, Literal

import pytest
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from ava.config import ConfigFiles, WorldSize, load_config
from ava.config.schema import AvaConfig
from ava.config.schema.compatibility import COMPATIBILITY_ONLY
from tests.conftest import REPO

PACKAGE = REPO / "ava"
SCHEMA = PACKAGE / "config" / "schema"
ONE = WorldSize(1, "test")


def _models(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models inside an annotation: `X`, `X | None`, `list[X]`, `dict[str, X]`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models(arg)]


def _schema_fields() -> dict[str, tuple[str, FieldInfo]]:
    """Every field of the root config, recursively, by dotted key: its name and its pydantic field."""
    found: dict[str, tuple[str, FieldInfo]] = {}

    def walk(model: type[BaseModel], prefix: str, seen: frozenset[type[BaseModel]]) -> None:
        for name, field in model.model_fields.items():
            found[prefix + name] = (name, field)
            for sub in _models(field.annotation):
                if sub not in seen:
                    walk(sub, f"{prefix}{name}.", seen | {sub})

    walk(AvaConfig, "", frozenset())
    return found


def _names_used(tree: ast.AST) -> set[str]:
    """Attribute names and string constants of a tree, leaving out docstrings and other bare string statements."""
    prose = {id(node.value) for node in ast.walk(tree)
             if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)}
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            names.add(node.attr)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in prose:
            names.add(node.value)
    return names


def _names_read_by_the_code() -> set[str]:
    """Names ava/ reads outside the schema, plus what the schema's properties and methods it reads read."""
    read: set[str] = set()
    for path in PACKAGE.rglob("*.py"):
        if SCHEMA not in path.parents:
            read |= _names_used(ast.parse(path.read_text(), str(path)))
    helpers: dict[str, set[str]] = {}  # schema property/method -> names it reads
    for path in SCHEMA.rglob("*.py"):
        for cls in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(cls, ast.ClassDef):
                for fn in cls.body:
                    if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                        helpers.setdefault(fn.name, set()).update(_names_used(fn))
    reached: set[str] = set()
    while todo := [name for name in helpers if name in read and name not in reached]:
        for name in todo:
            reached.add(name)
            read |= helpers[name]
    return read


FIELDS = _schema_fields()
READ = _names_read_by_the_code()


def test_the_walk_reaches_nested_sections_and_lists_of_models():
    for key in ("training.gradient_health.max_rollbacks", "training.lora.rank", "rlhf.ppo.kl_target",
                "model.moh.num_shared_heads", "data.sources.weight", "deepspeed.optimizer.params.betas"):
        assert key in FIELDS, key


def test_every_schema_key_is_read_by_the_code_or_listed_as_compatibility_only():
    inert = sorted(key for key, (name, _) in FIELDS.items() if name not in READ and key not in COMPATIBILITY_ONLY)
    assert not inert, (
        f"schema keys that nothing in ava/ reads: {', '.join(inert)}. Make the code read them, or list them in "
        "ava/config/schema/compatibility.py with the reason they have no effect")


@pytest.mark.parametrize("key", sorted(COMPATIBILITY_ONLY))
def test_a_compatibility_only_key_is_a_schema_key_that_nothing_reads(key):
    assert key in FIELDS, f"{key} is listed as compatibility-only but is not a schema key"
    name = FIELDS[key][0]
    assert name not in READ, (f"{key} is listed as compatibility-only, but ava/ reads '{name}': "
                              "remove it from ava/config/schema/compatibility.py")


def _other_value(field: FieldInfo) -> Any:
    """A valid value other than the field's default."""
    default = field.get_default(call_default_factory=True)
    args = [a for a in typing.get_args(field.annotation) if a is not type(None)]
    literal = next((a for a in [field.annotation, *args] if typing.get_origin(a) is Literal), None)
    if literal is not None:
        return next(v for v in typing.get_args(literal) if v != default)
    if field.annotation is bool:
        return not default
    if int in args or field.annotation is int or isinstance(field.annotation, types.UnionType):
        return (default or 0) + 1
    raise AssertionError(f"no other value known for {field.annotation}: extend _other_value")


def _yaml(key: str, value: Any) -> str:
    section, name = key.split(".")
    text = ("true" if value else "false") if isinstance(value, bool) else value
    return f"{section}:\n  {name}: {text}\n"


@pytest.mark.parametrize("key", sorted(COMPATIBILITY_ONLY))
def test_a_compatibility_only_key_set_to_another_value_warns_saying_why_where_it_was_set(key, write_yaml):
    value = _other_value(FIELDS[key][1])
    path = write_yaml("c.yaml", "# a config\n" + _yaml(key, value))
    warnings = [n for n in load_config(ConfigFiles(path), world=ONE).notices if n.key == key]
    assert len(warnings) == 1
    assert warnings[0].level == "warning" and warnings[0].where == f"{path}:3"
    assert "has no effect" in warnings[0].message and COMPATIBILITY_ONLY[key] in warnings[0].message


@pytest.mark.parametrize("key", sorted(COMPATIBILITY_ONLY))
def test_a_compatibility_only_key_at_its_default_is_silent(key, write_yaml):
    default = FIELDS[key][1].get_default(call_default_factory=True)
    text = _yaml(key, default) if default is not None else f"{key.split('.')[0]}: {{}}\n"
    notices = load_config(ConfigFiles(write_yaml("c.yaml", text)), world=ONE).notices
    assert not [n for n in notices if n.key == key]


def test_the_warning_comes_from_any_layer_and_names_the_one_that_set_the_value(write_yaml):
    config = write_yaml("config.yaml", "data:\n  padding_side: right\n")
    hardware = write_yaml("hardware.yaml", "data:\n  dataloader_persistent_workers: false\n")
    resolved = load_config(ConfigFiles(config, hardware), ["--padding_side", "left"], ONE)
    where = {n.key: n.where for n in resolved.notices if "has no effect" in n.message}
    assert where["data.dataloader_persistent_workers"] == f"{hardware}:2"
    assert where["data.padding_side"].startswith("command line")
    assert not [n for n in load_config(ConfigFiles(config), world=ONE).notices if n.key == "data.padding_side"]

