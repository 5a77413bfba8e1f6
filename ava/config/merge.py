"""Deep-merge configuration layers while recording where every value came from.

Semantics: mappings merge key by key; any other value (scalars, lists)
replaces what was there; an explicit `null` removes the key so the schema
default applies again.  Each assignment is kept in a per-key history so
`ava config explain` can show the whole chain of overrides.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from ava.config.provenance import Assignment, Layer, Origin
from ava.config.yaml_loader import KeyPath, LoadedYaml


@dataclass(frozen=True)
class Leaf:
    """One value assigned by one layer at one key path."""

    path: KeyPath
    value: Any
    origin: Origin
    parents: tuple[Origin, ...] = ()  # where each enclosing section key was written, outermost first


@dataclass
class MergedTree:
    """The merged raw (unvalidated) config with provenance."""

    data: dict[str, Any] = field(default_factory=dict)
    origins: dict[KeyPath, Origin] = field(default_factory=dict)  # leaf -> origin of current value
    locations: dict[KeyPath, Origin] = field(default_factory=dict)  # any key -> where last written
    history: dict[KeyPath, list[Assignment]] = field(default_factory=dict)

    def get(self, path: KeyPath, default: Any = None) -> Any:
        node: Any = self.data
        for key in path:
            if not isinstance(node, dict) or key not in node:
                return default
            node = node[key]
        return node

    def is_set(self, path: KeyPath) -> bool:
        return path in self.origins

    def apply(self, leaf: Leaf) -> None:
        """Assign one leaf, replacing scalars that stand where a mapping must go."""
        node = self.data
        for depth, key in enumerate(leaf.path[:-1]):
            prefix = leaf.path[: depth + 1]
            if not isinstance(node.get(key), dict):
                self._forget(prefix)
                node[key] = {}
            if depth < len(leaf.parents):
                self.locations[prefix] = leaf.parents[depth]
            else:
                self.locations.setdefault(prefix, leaf.origin)
            node = node[key]
        last = leaf.path[-1]
        self._forget(leaf.path)
        self.locations[leaf.path] = leaf.origin
        self.history.setdefault(leaf.path, []).append(
            Assignment(leaf.value, leaf.origin, reset=leaf.value is None))
        if leaf.value is None:
            node.pop(last, None)
        else:
            node[last] = leaf.value
            self.origins[leaf.path] = leaf.origin

    def remove(self, path: KeyPath) -> None:
        """Drop a key entirely (used when an alias is folded into its canonical key)."""
        parent = self.get(path[:-1])
        if isinstance(parent, dict):
            parent.pop(path[-1], None)
        self._forget(path)

    def _forget(self, path: KeyPath) -> None:
        n = len(path)
        for known in [p for p in self.origins if p[:n] == path]:
            del self.origins[known]


def yaml_leaves(loaded: LoadedYaml, layer: Layer) -> Iterator[Leaf]:
    """Flatten a loaded YAML file into leaf assignments, with file:line origins."""

    def walk(node: dict[str, Any], prefix: KeyPath, parents: tuple[Origin, ...]) -> Iterator[Leaf]:
        for key, value in node.items():
            path = (*prefix, key)
            origin = Origin(layer, loaded.path, loaded.lines.get(path), ".".join(path))
            if isinstance(value, dict) and value:
                yield from walk(value, path, (*parents, origin))
            elif isinstance(value, dict):
                continue  # `section: {}` changes nothing
            else:
                yield Leaf(path, value, origin, parents)

    yield from walk(loaded.data, (), ())


def merge(layers: list[list[Leaf]]) -> MergedTree:
    """Apply layers in order; later layers win."""
    tree = MergedTree()
    for leaves in layers:
        for leaf in leaves:
            tree.apply(leaf)
    return tree
