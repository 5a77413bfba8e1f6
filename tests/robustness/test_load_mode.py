"""Load mode (`AVA_TEST_LOAD`, tests/conftest.py): busy processes beside the tests, never outliving pytest."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, load_processes

# Run by a nested pytest in load mode: writes the busy processes' pids, then waits to be ended.
NESTED = """
import time
from pathlib import Path

from tests.conftest import _busy


def test_busy_processes_run_beside_the_tests():
    Path("busy.tmp").write_text(" ".join(str(p.pid) for p in _busy))
    Path("busy.tmp").rename("busy.pids")  # whole, when the test looks
    time.sleep(float(Path("sleep_s").read_text()))
"""


def test_the_load_is_a_number_of_busy_processes_per_core() -> None:
    assert load_processes(None, 2) == load_processes("", 2) == load_processes("0", 2) == 0
    assert load_processes("1", 2) == 2 and load_processes("3", 4) == 12
    assert load_processes("1", None) == 1  # os.cpu_count() may not know
    with pytest.raises(pytest.UsageError, match="AVA_TEST_LOAD='many'"):
        load_processes("many", 2)


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):
        return True


def _nested(tmp_path: Path, sleep_s: float) -> tuple[subprocess.Popen[str], list[int]]:
    (tmp_path / "test_nested.py").write_text(NESTED)
    (tmp_path / "sleep_s").write_text(str(sleep_s))
    env = {**os.environ, "AVA_TEST_LOAD": "1", "PYTHONPATH": str(REPO)}
    nested = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "tests.conftest", "-p", "no:cacheprovider",
                               "test_nested.py"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not (tmp_path / "busy.pids").is_file() and nested.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    if not (tmp_path / "busy.pids").is_file():
        nested.kill()
        pytest.fail(f"the nested pytest did not start its test:\n{nested.communicate()[0][-3000:]}")
    pids = [int(p) for p in (tmp_path / "busy.pids").read_text().split()]
    assert len(pids) == (os.cpu_count() or 1), pids
    assert not any(_gone(p) for p in pids)
    return nested, pids


@pytest.mark.slow
def test_the_busy_processes_end_with_the_session(tmp_path: Path) -> None:
    nested, pids = _nested(tmp_path, sleep_s=0)
    output, _ = nested.communicate(timeout=120)
    assert nested.returncode == 0, output
    assert all(_gone(p) for p in pids)


@pytest.mark.slow
def test_the_busy_processes_end_themselves_when_pytest_is_killed(tmp_path: Path) -> None:
    nested, pids = _nested(tmp_path, sleep_s=60)
    nested.send_signal(signal.SIGKILL)  # no cleanup runs: each busy process must see its parent gone
    nested.communicate(timeout=30)
    deadline = time.monotonic() + 10
    while not all(_gone(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert all(_gone(p) for p in pids), [p for p in pids if not _gone(p)]
