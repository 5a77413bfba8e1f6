"""The model package's modules import in one direction: no two of them import each other."""

from __future__ import annotations

import ast
from pathlib import Path

import ava.model


def _imports() -> dict[str, set[str]]:
    """Each ava.model module and the ava.model modules it imports, anywhere in its file: a lazy import inside
    a function and one under TYPE_CHECKING count, since they hide a cycle rather than remove it."""
    root = Path(ava.model.__file__).parent
    names = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent.parent).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph: dict[str, set[str]] = {}
    for name, path in names.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                targets |= {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
            elif isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
        graph[name] = {t for t in targets if t in names and t != name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state and (found := visit(nxt, [*path, nxt])):
                return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start, [start])):
            return found
    return None


def test_no_model_modules_import_each_other_directly_or_through_others():
    graph = _imports()
    assert "ava.model.transformer" in graph["ava.model.summary"]  # the scan sees imports
    assert "ava.model.generate" in graph["ava.model.transformer"]
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])
