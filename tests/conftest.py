"""Shared test helpers: the repo root and a way to write small YAML files."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# DeepSpeed on a machine without a GPU needs its CPU accelerator.
os.environ.setdefault("DS_ACCELERATOR", "cpu")


@pytest.fixture
def write_yaml(tmp_path: Path):
    """write_yaml("name.yaml", '''yaml text''') -> path (dedented)."""

    def write(name: str, text: str) -> str:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text).lstrip("\n"))
        return str(path)

    return write


@pytest.fixture(autouse=True)
def _no_launcher_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests choose the world size explicitly; a WORLD_SIZE from the caller must not leak in."""
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
