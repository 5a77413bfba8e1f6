"""Text renderings of a resolved config: YAML with origins, and one key's explanation."""

from __future__ import annotations

from typing import Any

import yaml

from ava.config import keys
from ava.config.aliases import ALIAS_GROUPS, BETA_KEYS, BETAS, alias_of
from ava.config.loader import ResolvedConfig
from ava.config.provenance import Layer
from ava.secrets import redact, redact_text, secret_values


def scalar(value: Any) -> str:
    """One value as YAML flow text that Ava's loader reads back to the same value."""
    text = yaml.safe_dump(value, default_flow_style=True, width=1_000_000).strip()
    return text[:-4].rstrip() if text.endswith("\n...") or text.endswith(" ...") else text.removesuffix("...").strip()


def render_yaml(resolved: ResolvedConfig, *, with_origins: bool) -> str:
    """The resolved config as YAML; with origins, each leaf carries `# file:line`.

    Secrets are masked: this text becomes the run's config.yaml, which is shared with the results.
    """
    lines: list[str] = []
    secrets = secret_values()
    data = redact(resolved.to_dict(), secrets)

    def walk(node: dict[str, Any], prefix: tuple[str, ...], indent: int) -> None:
        for key, value in node.items():
            path = (*prefix, key)
            pad = "  " * indent
            if isinstance(value, dict):
                lines.append(f"{pad}{key}:")
                walk(value, path, indent + 1)
                continue
            text = f"{pad}{key}: {scalar(value)}"
            if with_origins:
                origin = resolved.origin(path)
                note = origin.describe()
                if origin.key and origin.key != ".".join(path) and origin.layer is not Layer.DERIVED:
                    note += f" (as {origin.key})"
                text = f"{text:<56} # {note}"
            lines.append(text)

    walk(data, (), 0)
    return redact_text("\n".join(lines) + "\n", secrets)  # an origin can quote a command-line value


def explain(resolved: ResolvedConfig, path: tuple[str, ...]) -> str:
    """Value, type, default, origin and the full override chain of one key (secrets masked)."""
    path = alias_of(path) or path
    info = keys.lookup(path)
    assert info is not None
    value: Any = resolved.to_dict()
    for part in path:
        value = value[part]
    origin = resolved.origin(path)
    out = [f"{info.dotted} = {scalar(value)}",
           f"  from:        {origin.describe()}",
           f"  type:        {info.type_name()}",
           f"  default:     {scalar(info.default())}"]
    if info.description:
        out.append(f"  meaning:     {info.description}")
    names = _aliases(path)
    if names:
        out.append("  also named:  " + ", ".join(names) + " (one setting; the highest-precedence layer wins)")
    # alias histories were folded into the canonical key when the config was loaded
    history = sorted(resolved.history.get(path, []), key=lambda a: a.origin.layer)
    if history:
        out.append("  set by (lowest precedence first):")
        for a in history:
            shown = "null (reset to default)" if a.reset else scalar(a.value)
            written = f" as {a.origin.key}" if a.origin.key and a.origin.key != info.dotted else ""
            out.append(f"    {a.origin.layer.label:<12} {a.origin.where():<48} {shown}{written}")
    else:
        out.append("  set by:      no file or flag; the default applies")
    if origin.layer is Layer.DERIVED:
        out.append(f"  derived:     {origin.detail}")
    return redact_text("\n".join(out), secret_values())


def _aliases(path: tuple[str, ...]) -> list[str]:
    for group in ALIAS_GROUPS:
        members = (group.canonical, *group.aliases)
        if path in members:
            return [".".join(p) for p in members if p != path]
    if path in BETA_KEYS or path == BETAS:
        return [".".join(p) for p in (*BETA_KEYS, BETAS) if p != path]
    return []
