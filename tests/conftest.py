"""Shared test helpers: the repo root, a way to write small YAML files, and load mode.

Load mode (`AVA_TEST_LOAD=1`, or `=N` for N per core) runs one CPU-bound
process per core beside the tests for the whole session, so that a test
which depends on a quiet machine (a race, a timing, a thread count) fails
here rather than on a busy CI runner. The busy processes end with the
session, on Ctrl-C too, and each also ends itself once pytest is gone.
"""

from __future__ import annotations

import atexit
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ava.train.runtime.op_build import use_per_venv_extensions_dir

REPO = Path(__file__).resolve().parents[1]

# DeepSpeed on a machine without a GPU needs its CPU accelerator.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# Every process a test starts builds DeepSpeed's ops in this virtualenv's own directory, as train.py's do. In
# torch's shared default, workers of two checkouts' suites rebuilt each other's ops, and a worker killed while
# it held the build lock left a lock every later worker waited on forever.
use_per_venv_extensions_dir()


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


LOAD_ENV = "AVA_TEST_LOAD"
# Spins one core, looking up every half second whether pytest (its parent) is still there.
_BUSY = """
import os, sys, time
parent = int(sys.argv[1])
while os.getppid() == parent:
    until = time.monotonic() + 0.5
    while time.monotonic() < until:
        pass
"""
_busy: list[subprocess.Popen[bytes]] = []


def load_processes(value: str | None, cores: int | None) -> int:
    """How many busy processes `AVA_TEST_LOAD=value` asks for: `value` per core (unset, empty or 0: none)."""
    if not value:
        return 0
    try:
        per_core = int(value)
    except ValueError:
        raise pytest.UsageError(f"{LOAD_ENV}={value!r}: give a whole number of busy processes per CPU core, "
                                "e.g. 1") from None
    if per_core < 0:
        raise pytest.UsageError(f"{LOAD_ENV}={value!r}: must be 0 or more")
    return per_core * (cores or 1)


def pytest_configure(config: pytest.Config) -> None:
    # Popped, so that nothing the tests start (a nested pytest, a training run) adds load of its own.
    count = load_processes(os.environ.pop(LOAD_ENV, None), os.cpu_count())
    for _ in range(count):
        _busy.append(subprocess.Popen([sys.executable, "-c", _BUSY, str(os.getpid())], stdin=subprocess.DEVNULL,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                      start_new_session=True))  # a terminal's Ctrl-C is pytest's to handle
    if count:
        atexit.register(_stop_load)


def pytest_report_header(config: pytest.Config) -> str | None:
    return f"load mode: {len(_busy)} CPU-bound process(es) beside the tests ({LOAD_ENV})" if _busy else None


def pytest_unconfigure(config: pytest.Config) -> None:
    _stop_load()


def _stop_load() -> None:
    while _busy:
        process = _busy.pop()
        process.kill()
        process.wait()
