"""Ava's packages are layers: each imports only those below it, never one above, never its own importer.

From the bottom: ava.errors; config; data and model; hf; rag; train; rlhf and
doctor; cli. The path of data is the architecture, so nothing downstream reaches back
upstream and no two packages import each other, directly or through others.
Every import in a file counts, wherever it is (inside a function, under
TYPE_CHECKING): a lazy import hides a cycle, it does not remove it.
"""

from __future__ import annotations

import ast
import builtins
import json
import subprocess
import sys
import textwrap
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

from tests.conftest import REPO

PACKAGE = REPO / "ava"

Edges = dict[str, dict[str, set[str]]]  # unit -> unit it imports -> the "file imports module" lines behind it


def _modules() -> dict[str, Path]:
    """Every module of the ava package by dotted name (a package by its own name, for its __init__.py)."""
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _imported(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    """The ava modules `path` (module `name`) imports, anywhere in the file, absolute or relative."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            # `from ava.config import loader` imports the module ava.config.loader; `from ava.config import X`,
            # a name of ava.config.
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target not in modules and "." in target:  # `import ava.config.schema.model.X` -> its module
                target = target.rpartition(".")[0]
            if target in modules and target != name:
                found.add(target)
    return found


def _package_edges() -> Edges:
    """Import edges between sibling units at every folder level.

    An import from module F to module M is an edge between the two children
    of their deepest common package that hold F and M: `ava.config` ->
    `ava.model` at the top, `ava.config.schema` -> `ava.config.batch` one
    level down, `ava.train.engine` -> `ava.train.callbacks` inside train
    should it get sub-packages. A module importing its own package or one of
    its own sub-packages is inside one unit. At least one side of each edge is
    a package: an edge between two plain modules of one folder is a
    module-level import, which the per-package tests judge.
    """
    modules = _modules()
    # A folder is a package here with or without its __init__.py (one being written may not have it yet).
    packages = {".".join(path.relative_to(REPO).parent.parts) for path in modules.values()}
    edges: Edges = defaultdict(lambda: defaultdict(set))
    for name, path in modules.items():
        for target in _imported(path, name, modules):
            a, b = name.split("."), target.split(".")
            common = 0
            while common < min(len(a), len(b)) and a[common] == b[common]:
                common += 1
            if common in (len(a), len(b)):
                continue  # one is the other's package: the same unit at every level where they differ
            source_unit, target_unit = ".".join(a[: common + 1]), ".".join(b[: common + 1])
            if source_unit in packages or target_unit in packages:
                edges[source_unit][target_unit].add(f"{path.relative_to(REPO)} imports {target}")
    return edges


def _cycles(edges: Edges) -> list[list[str]]:
    """The strongly connected components of two units or more (Tarjan): every cycle, of any length, lies in one."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, {})):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def _describe(cycles: list[list[str]], edges: Edges) -> str:
    lines = []
    for component in cycles:
        lines.append("cycle between " + ", ".join(component) + ":")
        for source in component:
            for target in component:
                for why in sorted(edges.get(source, {}).get(target, ())):
                    lines.append(f"  {source} -> {target}: {why}")
    return "\n".join(lines)


def test_no_two_packages_import_each_other() -> None:
    edges = _package_edges()
    assert "ava.config" in edges["ava.model"] and "ava.model" in edges["ava.hf"]  # the scan sees imports
    assert "ava.config.schema" in edges["ava.config.loader"]  # ... and the levels below the top one
    cycles = _cycles(edges)
    assert not cycles, "packages that import each other (directly or through others):\n" + _describe(cycles, edges)


def test_the_cycle_finder_reports_a_cycle_through_three_packages() -> None:
    edges: Edges = {"a": {"b": {"x"}}, "b": {"c": {"y"}}, "c": {"a": {"z"}, "d": {"w"}}}
    assert _cycles(edges) == [["a", "b", "c"]]
    assert "c -> a: z" in _describe(_cycles(edges), edges)


def _classes() -> dict[str, tuple[str, ast.ClassDef]]:
    """Every class defined under ava/, by `file:Name`."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ClassDef):
                found[f"{path.relative_to(REPO)}:{node.name}"] = (node.name, node)
    return found


def _carries_a_fix(node: ast.ClassDef) -> bool:
    """Whether the class itself gives its instances a `fix` (a parameter of __init__, or an attribute it sets)."""
    for item in ast.walk(node):
        if isinstance(item, ast.FunctionDef) and item.name == "__init__":
            if any(arg.arg == "fix" for arg in item.args.args + item.args.kwonlyargs):
                return True
        if isinstance(item, ast.Attribute) and item.attr == "fix" and isinstance(item.ctx, ast.Store):
            return True
        if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name) and item.target.id == "fix":
            return True
    return False


def test_the_user_error_type_lives_at_the_root() -> None:
    from ava.config import ConfigError
    from ava.errors import UserError

    assert issubclass(UserError, ValueError) and issubclass(ConfigError, UserError)
    assert UserError("bad", "do this").fix == "do this"
    classes = _classes()
    assert [where for where, (name, _) in classes.items() if name == "UserError"] == ["ava/errors.py:UserError"]
    # A second base would be an exception with its own message + fix that does not derive from UserError: the CLI
    # would show it as a crash, and a Python caller's `except UserError` would miss it.
    by_name = {name: node for name, node in classes.values()}

    def derives_from(node: ast.ClassDef, wanted: Callable[[str], bool], seen: frozenset[str] = frozenset()) -> bool:
        for base in node.bases:
            name = base.attr if isinstance(base, ast.Attribute) else getattr(base, "id", "")
            if wanted(name) or (name in by_name and name not in seen
                                and derives_from(by_name[name], wanted, seen | {name})):
                return True
        return False

    def builtin_exception(name: str) -> bool:
        kind = getattr(builtins, name, None)
        return isinstance(kind, type) and issubclass(kind, BaseException)

    bases = [where for where, (_, node) in classes.items()
             if _carries_a_fix(node) and derives_from(node, builtin_exception)
             and not derives_from(node, lambda name: name == "UserError")]
    assert bases == ["ava/errors.py:UserError"], f"user-error types besides ava.errors.UserError: {bases}"
    assert not (PACKAGE / "model" / "errors.py").exists()
    assert not _imported(PACKAGE / "errors.py", "ava.errors", _modules())  # the bottom of the stack imports no ava


def test_the_config_package_imports_no_model_code(tmp_path: Path) -> None:
    """Loading configs, also one whose `training.init_from` architecture is adopted, imports no torch and no model.

    Both kinds of init_from directory are read: an Ava model directory (ava_model.yaml) and a Hugging Face one
    (config.json); only their config files are written, since the architecture is all config loading reads.
    """
    ava_dir, hf_dir = tmp_path / "ava_model", tmp_path / "gpt2"
    ava_dir.mkdir()
    hf_dir.mkdir()
    (ava_dir / "ava_model.yaml").write_text(textwrap.dedent("""\
        model:
          hidden_size: 64
          num_layers: 2
          num_attention_heads: 4
          intermediate_size: 128
          vocab_size: 256
          max_position_embeddings: 64
        """))
    (hf_dir / "config.json").write_text(json.dumps({
        "model_type": "gpt2", "n_embd": 32, "n_layer": 3, "n_head": 4, "n_positions": 64, "vocab_size": 300}))
    base = tmp_path / "finetune.yaml"
    base.write_text("data:\n  max_length: 32\n")
    script = textwrap.dedent(f"""
        import json, sys
        from ava.config import ConfigFiles, WorldSize, load_config

        world = WorldSize(1, "t")
        load_config(ConfigFiles("configs/gpu/tiny.yaml"), world=world)
        shapes = [load_config(ConfigFiles({str(base)!r}), ["--training.init_from", d], world=world).config.model
                  for d in ({str(ava_dir)!r}, {str(hf_dir)!r})]
        print(json.dumps({{
            "loaded": sorted(m for m in sys.modules
                             if m in ("torch", "ava.model", "ava.hf") or m.startswith(("ava.model.", "ava.hf."))),
            "shapes": [[m.hidden_size, m.num_layers, m.vocab_size] for m in shapes],
        }}))
        """)
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["shapes"] == [[64, 2, 256], [32, 3, 300]]  # each checkpoint's architecture was adopted
    assert report["loaded"] == [], f"config loading imported model code: {report['loaded']}"
