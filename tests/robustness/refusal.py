"""What every refused start through a real command must show: exit 2, no traceback, a fix, the expected words."""

from __future__ import annotations

import subprocess
from collections.abc import Iterable


def assert_refused_cleanly(result: subprocess.CompletedProcess[str], needles: Iterable[str]) -> str:
    """Check `result` is a clean refusal naming each of `needles`; returns the output shown with a failure."""
    shown = f"\n--- exit {result.returncode}\n--- stdout:\n{result.stdout[-2000:]}\n--- stderr:\n{result.stderr[-3000:]}"
    assert result.returncode == 2, "expected exit status 2" + shown
    assert "Traceback" not in result.stdout + result.stderr, "a traceback was printed" + shown
    assert "Fix:" in result.stderr, "the message gives no fix" + shown
    for needle in needles:
        assert needle in result.stderr, f"missing from stderr: {needle!r}" + shown
    return shown
