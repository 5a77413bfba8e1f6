"""DeepSpeed's op builds: a directory per virtualenv, and a stale build lock stops a run instead of hanging it.

The unit tests use locks under tmp_path with fixed modification times and an injected clock; the end-to-end
tests run train.py against a stale lock in a temporary extensions directory (never the real cache, which other
runs on this machine share).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ava.train.runtime.op_build import (
    ENV_VAR,
    STALE_AFTER_S,
    StaleOpLockError,
    default_root,
    find_locks,
    prepare_op_builds,
    use_per_venv_extensions_dir,
    venv_extensions_dir,
    wait_for_lock,
)
from tests.conftest import REPO
from tests.train.run_helpers import SMALL_RUN, TINY, run_env

T0 = 1_700_000_000.0  # the time every file of a test's op directory was last written


def _op_dir(root: Path, op: str = "deepspeed_shm_comm", *, locked: bool = True) -> Path:
    """An op's build directory as a build killed midway leaves it: build.ninja and the lock, both written at T0."""
    op_dir = root / op
    op_dir.mkdir(parents=True)
    (op_dir / "build.ninja").write_text("rule cxx\n")
    if locked:
        (op_dir / "lock").touch()
    for path in op_dir.iterdir():
        os.utime(path, (T0, T0))
    return op_dir


class FakeTime:
    """A clock that only the waiting code's sleeps move; `on_sleep` acts at given times (a build's progress)."""

    def __init__(self, now: float, on_sleep=None):
        self.now, self.sleeps, self.on_sleep = now, 0, on_sleep

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds
        self.sleeps += 1
        if self.on_sleep is not None:
            self.on_sleep(self)


# ---------------------------------------------------------------- the directory per virtualenv


def test_an_unset_extensions_dir_becomes_this_virtualenvs_own():
    environ: dict[str, str] = {}
    chosen = use_per_venv_extensions_dir(environ)
    real = os.path.realpath(sys.prefix)
    assert environ[ENV_VAR] == str(chosen.path) == str(venv_extensions_dir())
    assert chosen.chosen_by == "per-virtualenv default"
    assert chosen.path.parent.parent == default_root()
    assert chosen.path.parent.name.endswith("-" + hashlib.sha256(real.encode()).hexdigest()[:10])
    assert chosen.path.name == f"py{sys.version_info.major}{sys.version_info.minor}_cpu"  # torch's flavour folder


def test_two_virtualenvs_get_two_directories_and_every_rank_of_one_the_same():
    first, second = venv_extensions_dir("/opt/envs/a/.venv"), venv_extensions_dir("/opt/envs/b/.venv")
    assert first != second
    assert first.parent.name.startswith("a_.venv-") and second.parent.name.startswith("b_.venv-")
    assert venv_extensions_dir("/opt/envs/a/.venv") == first  # each rank computes it alone


def test_an_extensions_dir_the_user_set_is_kept():
    environ = {ENV_VAR: "/scratch/me/torch_ext"}
    chosen = use_per_venv_extensions_dir(environ)
    assert environ == {ENV_VAR: "/scratch/me/torch_ext"}
    assert (chosen.path, chosen.chosen_by) == (Path("/scratch/me/torch_ext"), ENV_VAR)
    assert chosen.describe() == f"/scratch/me/torch_ext (set by {ENV_VAR})"


def test_an_empty_extensions_dir_counts_as_unset():
    environ = {ENV_VAR: ""}  # torch would build in the current directory
    assert use_per_venv_extensions_dir(environ).chosen_by == "per-virtualenv default"
    assert environ[ENV_VAR] == str(venv_extensions_dir())


# ---------------------------------------------------------------- telling a stale lock from a live one


def test_a_lock_nobody_holds_in_a_directory_quiet_for_long_is_stale(tmp_path):
    op_dir = _op_dir(tmp_path)
    [lock] = find_locks(tmp_path, now=T0 + 3600)
    assert (lock.path, lock.op, lock.holders, lock.stale) == (op_dir / "lock", "deepspeed_shm_comm", (), True)
    assert "stale" in lock.state() and f"Remove it: rm {op_dir / 'lock'}" in lock.state()


def test_a_lock_a_process_holds_open_is_a_running_build_however_old(tmp_path):
    op_dir = _op_dir(tmp_path)
    fd = os.open(op_dir / "lock", os.O_RDONLY)  # as torch's FileBaton holds it through the build
    try:
        [lock] = find_locks(tmp_path, now=T0 + 3600)
    finally:
        os.close(fd)
    assert os.getpid() in lock.holders and not lock.stale
    assert lock.state().startswith("a build is running (process")


def test_a_recent_lock_nobody_here_holds_is_not_yet_stale(tmp_path):
    _op_dir(tmp_path)
    [lock] = find_locks(tmp_path, now=T0 + 10)  # another node's build, or one killed a moment ago
    assert not lock.stale and "another node" in lock.state()


def test_an_op_directory_without_a_lock_has_nothing_to_report(tmp_path):
    _op_dir(tmp_path, locked=False)
    assert find_locks(tmp_path, now=T0 + 3600) == []
    assert find_locks(tmp_path / "missing") == []


# ---------------------------------------------------------------- waiting on a lock


def test_waiting_on_a_stale_lock_raises_at_once_naming_the_lock_and_the_rm(tmp_path):
    lock = _op_dir(tmp_path) / "lock"
    time = FakeTime(T0 + 3600)
    with pytest.raises(StaleOpLockError) as stale:
        wait_for_lock(lock, clock=time.clock, sleep=time.sleep)
    assert time.sleeps == 0
    assert f"waits on the lock {lock}, which no build holds" in str(stale.value)
    assert stale.value.fix == f"remove it (rm {lock}) and start again; the op is then built once"
    assert stale.value.every_rank


def test_waiting_ends_when_the_build_removes_its_lock(tmp_path):
    lock = _op_dir(tmp_path) / "lock"
    warnings: list[str] = []
    time = FakeTime(T0 + 5, on_sleep=lambda t: lock.unlink() if t.sleeps == 3 else None)
    wait_for_lock(lock, clock=time.clock, sleep=time.sleep, warn=warnings.append)
    assert time.sleeps == 3
    assert len(warnings) == 1 and f"waiting on DeepSpeed op-build lock {lock}" in warnings[0]


def test_an_unheld_lock_becomes_stale_once_its_directory_has_been_quiet_long_enough(tmp_path):
    lock = _op_dir(tmp_path) / "lock"
    time = FakeTime(T0 + 10)
    with pytest.raises(StaleOpLockError):
        wait_for_lock(lock, clock=time.clock, sleep=time.sleep, poll_s=1.0)
    assert time.now == T0 + STALE_AFTER_S


def test_a_build_on_another_node_that_writes_its_files_keeps_the_wait_going(tmp_path):
    op_dir = _op_dir(tmp_path)

    def compile_step_ends(t: FakeTime) -> None:
        if t.now == T0 + 200:  # an object file lands in the shared directory
            (op_dir / "shm.o").touch()
            os.utime(op_dir / "shm.o", (t.now, t.now))

    time = FakeTime(T0 + 10, on_sleep=compile_step_ends)
    with pytest.raises(StaleOpLockError):
        wait_for_lock(op_dir / "lock", clock=time.clock, sleep=time.sleep, poll_s=1.0)
    assert time.now == T0 + 200 + STALE_AFTER_S


def test_a_build_here_that_holds_the_lock_is_waited_for_past_the_quiet_limit(tmp_path):
    lock = _op_dir(tmp_path) / "lock"
    fd = os.open(lock, os.O_RDONLY)
    try:
        time = FakeTime(T0 + 3600, on_sleep=lambda t: lock.unlink() if t.sleeps == 5 else None)
        wait_for_lock(lock, clock=time.clock, sleep=time.sleep)
    finally:
        os.close(fd)
    assert time.sleeps == 5


def test_torch_extension_load_on_a_stale_lock_raises_instead_of_waiting_forever(tmp_path):
    source = tmp_path / "op.cpp"
    source.write_text("int answer() { return 42; }\n")
    lock = _op_dir(tmp_path / "ext", "ava_test_op") / "lock"
    program = ("from ava.train.runtime.op_build import guard_lock_waits\nguard_lock_waits()\n"
               "from torch.utils.cpp_extension import load\n"
               f"load(name='ava_test_op', sources=[{str(source)!r}])\n")
    try:
        done = subprocess.run([sys.executable, "-c", program], cwd=REPO, capture_output=True, text=True, timeout=120,
                              env={**run_env(), ENV_VAR: str(tmp_path / "ext")})
    except subprocess.TimeoutExpired:
        pytest.fail(f"torch's build waited on the stale lock {lock} instead of stopping")
    assert done.returncode == 1
    assert "StaleOpLockError" in done.stderr and f"rm {lock}" in done.stderr


@pytest.mark.parametrize(("local_rank", "warned"), [("0", True), ("1", False)])
def test_a_nodes_first_rank_alone_warns_about_stale_locks_at_the_start(local_rank, warned, tmp_path, monkeypatch):
    from torch.utils import cpp_extension

    monkeypatch.setattr(cpp_extension, "FileBaton", cpp_extension.FileBaton)  # the guard goes again at teardown
    lock = _op_dir(tmp_path, "cpu_adam") / "lock"
    os.utime(lock.parent, (T0, T0))
    warnings: list[str] = []
    prepare_op_builds({ENV_VAR: str(tmp_path), "LOCAL_RANK": local_rank}, warn=warnings.append)
    assert [w.split(": no process")[0] for w in warnings] == (
        [f"ava: warning: DeepSpeed op-build lock {lock}: stale"] if warned else [])
    assert cpp_extension.FileBaton.ava_guarded  # every rank's waits are guarded


# ---------------------------------------------------------------- train.py and train_rlhf.py


RLHF = ["--rlhf_config", "configs/rlhf/test_cpu.yaml"]


@pytest.mark.parametrize(("script", "chosen_by"), [("train.py", "per-virtualenv default"),
                                                   ("train.py", "TORCH_EXTENSIONS_DIR"),
                                                   ("train_rlhf.py", "TORCH_EXTENSIONS_DIR")])
def test_training_stops_on_a_stale_lock_with_the_rm_fix_instead_of_hanging(script, chosen_by, tmp_path, monkeypatch):
    env = {**run_env(), "XDG_CACHE_HOME": str(tmp_path / "cache")}  # torch's cache root, inside tmp_path
    env.pop(ENV_VAR, None)
    if chosen_by == ENV_VAR:
        env[ENV_VAR] = str(tmp_path / "mine")
        ops = tmp_path / "mine"
    else:
        monkeypatch.setenv("XDG_CACHE_HOME", env["XDG_CACHE_HOME"])
        ops = venv_extensions_dir()
        assert ops.is_relative_to(tmp_path)
    used = _op_dir(ops) / "lock"  # the CPU all-reduce op, loaded as the process group starts
    unused = _op_dir(ops, "some_other_op") / "lock"
    flags = RLHF if script == "train_rlhf.py" else [*SMALL_RUN, "--max_steps", "4"]
    command = [sys.executable, script, *TINY, *flags, "--output_dir", str(tmp_path / "run")]
    try:
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{script} hung on the stale lock {used}")
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    assert f"ava: warning: DeepSpeed op-build lock {unused}: stale" in done.stderr  # said before DeepSpeed starts
    assert f"DeepSpeed's build of the deepspeed_shm_comm op waits on the lock {used}, which no build holds" in done.stderr
    assert f"Fix: remove it (rm {used}) and start again" in done.stderr
    assert "Traceback" not in done.stderr
