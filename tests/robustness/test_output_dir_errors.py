"""An --output_dir that cannot be written is refused before any work, as one paragraph, exit 2, nothing created.

Each case starts the real `train.py` (or `train_rlhf.py`) with an output
directory that is a file, lies under a file, or cannot be written (a
read-only file system, a directory without write permission), and holds it
to the user-error contract of `test_run_inputs.py`: exit 2, no traceback,
stderr names the path, what is wrong and a `Fix:`, and the case's directory
is unchanged (no file or directory added, none changed).

Read-only is made the way that really refuses this process: permission bits
(`chmod 0555`) when the tests run as an ordinary user; for root, which
ignores them, a read-only bind mount of the directory onto itself. Root
without the right to mount cannot be refused a write at all, and those cases
say so when they skip.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.robustness.refusal import assert_refused_cleanly
from tests.train.run_helpers import SMALL_RUN, TINY, run_env

TRAIN = [sys.executable, "train.py", *TINY, *SMALL_RUN, "--hidden_size", "32", "--num_layers", "1", "--max_steps", "3"]
RLHF = [sys.executable, "train_rlhf.py", *TINY, "--rlhf_config", "configs/rlhf/test_cpu.yaml", "--hidden_size", "32",
        "--num_layers", "1", "--vocab_size", "257", "--max_position_embeddings", "64", "--max_length", "64",
        "--num_experts", "0", "--rlhf.stages", "[sft]", "--rlhf.sft.steps", "3"]
AS_ROOT = os.geteuid() == 0
# What the system says when this process may not write there: a read-only mount for root, the mode bits otherwise.
REFUSED = "on a read-only file system" if AS_ROOT else "no permission to write in"


def _can_mount() -> bool:
    probe = Path(f"/tmp/ava-mount-probe-{os.getpid()}")
    probe.mkdir(exist_ok=True)
    try:
        mounted = subprocess.run(["mount", "--bind", str(probe), str(probe)], capture_output=True).returncode == 0
        if mounted:
            subprocess.run(["umount", str(probe)], check=True)
        return mounted
    except FileNotFoundError:
        return False
    finally:
        probe.rmdir()


CAN_REFUSE = not AS_ROOT or _can_mount()


@dataclass(frozen=True)
class DirCase:
    id: str
    argv: list[str]  # after the command; {tmp} is the case's directory
    expect: tuple[str, ...]  # fragments of stderr, {tmp} replaced
    read_only: str | None = None  # a directory under {tmp} made read-only (created, with `contents`)
    contents: tuple[str, ...] = ()  # files put in it first
    rlhf: bool = False


NOTES = "notes.txt"
CASES = [
    DirCase("output-dir-is-an-existing-file", ["--output_dir", "{tmp}/notes.txt"], (
        "the output directory {tmp}/notes.txt is a file, not a directory",
        "Fix: pass an --output_dir that is a directory, or a path that does not exist yet")),
    DirCase("output-dir-under-a-file", ["--output_dir", "{tmp}/notes.txt/run"], (
        "the output directory {tmp}/notes.txt/run cannot be created: {tmp}/notes.txt is a file, not a directory",
        "Fix: pass an --output_dir")),
    DirCase("output-dir-on-a-read-only-file-system", ["--output_dir", "{tmp}/ro/run"], (
        "the output directory {tmp}/ro/run cannot be written: {tmp}/ro is " if AS_ROOT else
        "the output directory {tmp}/ro/run cannot be written: ", REFUSED, "Fix: pass an --output_dir on a disk"),
        read_only="ro"),
    DirCase("output-dir-an-existing-read-only-directory", ["--output_dir", "{tmp}/ro"], (
        "the output directory {tmp}/ro cannot be written", REFUSED, "Fix:"), read_only="ro"),
    DirCase("output-dir-whose-nearest-parent-is-not-writable", ["--output_dir", "{tmp}/ro/a/b/run"], (
        "the output directory {tmp}/ro/a/b/run cannot be written", REFUSED, "{tmp}/ro"), read_only="ro"),
    DirCase("resume-in-a-read-only-run-directory", ["--output_dir", "{tmp}/ro", "--resume"], (
        "the output directory {tmp}/ro cannot be written", REFUSED, "Fix:"), read_only="ro", contents=(NOTES,)),
    DirCase("auto-resume-in-a-read-only-directory", ["--output_dir", "{tmp}/ro", "--auto_resume"], (
        "the output directory {tmp}/ro cannot be written", REFUSED), read_only="ro"),
    DirCase("rlhf-output-dir-is-an-existing-file", ["--output_dir", "{tmp}/notes.txt"], (
        "the output directory {tmp}/notes.txt is a file, not a directory",), rlhf=True),
    DirCase("rlhf-output-dir-on-a-read-only-file-system", ["--output_dir", "{tmp}/ro/run"], (
        "the output directory {tmp}/ro/run cannot be written", REFUSED), read_only="ro", rlhf=True),
]


def _state(root: Path) -> dict[str, str]:
    """Every file (with its content hash) and directory under `root`: what a refused start must leave as it was."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def _fill(text: str, tmp: Path) -> str:
    return text.replace("{tmp}", str(tmp))


@dataclass
class Outcome:
    result: subprocess.CompletedProcess[str]
    before: dict[str, str]
    after: dict[str, str]
    tmp: Path


class ReadOnly:
    """Makes directories read-only for this process (see the module docstring) and writable again afterwards."""

    def __init__(self) -> None:
        self.made: list[Path] = []

    def __call__(self, path: Path) -> None:
        if AS_ROOT:
            subprocess.run(["mount", "--bind", str(path), str(path)], check=True)
            self.made.append(path)
            subprocess.run(["mount", "-o", "remount,bind,ro", str(path)], check=True)
        else:
            path.chmod(0o555)
            self.made.append(path)

    def undo(self) -> None:
        for path in reversed(self.made):
            if AS_ROOT:
                subprocess.run(["umount", str(path)], check=False)
            else:
                path.chmod(0o755)


@pytest.fixture(scope="module")
def read_only() -> Iterator[Callable[[Path], None]]:
    made = ReadOnly()
    try:
        yield made
    finally:
        made.undo()


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory, read_only: Callable[[Path], None]) -> dict[str, Outcome]:
    def one(case: DirCase) -> Outcome:
        tmp = tmp_path_factory.mktemp(case.id)
        (tmp / NOTES).write_text("a file where a directory is expected\n")
        if case.read_only is not None:
            ro = tmp / case.read_only
            ro.mkdir()
            for name in case.contents:
                (ro / name).write_text("precious\n")
            read_only(ro)
        before = _state(tmp)
        head = RLHF if case.rlhf else TRAIN
        result = subprocess.run([*head, *(_fill(a, tmp) for a in case.argv)], cwd=REPO, env=run_env(),
                                capture_output=True, text=True, timeout=600)
        return Outcome(result, before, _state(tmp), tmp)

    runnable = [c for c in CASES if CAN_REFUSE or c.read_only is None]
    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip((c.id for c in runnable), pool.map(one, runnable), strict=True))


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_unwritable_output_dir_is_refused_before_any_work(case: DirCase, outcomes: dict[str, Outcome]) -> None:
    if case.id not in outcomes:
        pytest.skip("running as root without the right to mount: nothing can make a directory read-only for root")
    outcome = outcomes[case.id]
    result, tmp = outcome.result, outcome.tmp
    shown = assert_refused_cleanly(result, [_fill(needle, tmp) for needle in case.expect])
    assert outcome.after == outcome.before, "a refused start created or changed something" + shown
