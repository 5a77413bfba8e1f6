"""DeepSpeed's JIT-built ops: where they are cached, and the build lock a killed build leaves behind.

DeepSpeed compiles its C++ ops (CPU Adam, the CPU shared-memory all-reduce, fused Adam on GPUs) on first use
with `torch.utils.cpp_extension.load`, into `$TORCH_EXTENSIONS_DIR/<op>/`. Two things go wrong with torch's
defaults:

- The default directory, `~/.cache/torch_extensions/py311_cpu`, is per Python version and accelerator, not per
  virtualenv. A build records the include paths of the venv that made it, so two venvs on one machine rebuild
  each other's ops on every launch (40-90 s each). `use_per_venv_extensions_dir` gives each venv a directory of
  its own, unless the user chose one.
- One build at a time holds `<op>/lock`, which torch creates with O_EXCL and removes when the build ends; the
  others wait in `FileBaton.wait` until the file is gone. A build killed midway (SIGKILL, out of memory, a
  scheduler's kill) leaves the file, and every later launch waits forever, printing nothing.

A stale lock is told from a live one by two facts. torch's builder keeps the lock file open from creating it to
removing it, so a build in progress on this machine shows in /proc as a process holding it. A build on another
node that shares the directory (an NFS home) cannot be seen that way, but it writes into the op's directory as
each compile step ends. So a lock is stale when no process here holds it open and nothing in its directory,
the lock included, has changed for `STALE_AFTER_S`, far longer than one compile step.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, MutableMapping
from dataclasses import dataclass
from pathlib import Path

from ava.errors import UserError

ENV_VAR = "TORCH_EXTENSIONS_DIR"
STALE_AFTER_S = 300.0  # a compile step writes its object file well within this; a remote build shows progress
POLL_S = 1.0


class StaleOpLockError(UserError):
    """A DeepSpeed op build waits on a lock that no build holds any more."""

    every_rank = True  # each rank waits on its own node's lock


def _flavour() -> str:
    """torch's own subfolder name for the default root: Python version and accelerator, e.g. py311_cpu."""
    import torch

    if torch.version.hip is not None:
        accelerator = f"rocm{torch.version.hip.replace('.', '')}"
    elif torch.version.cuda is not None:
        accelerator = f"cu{torch.version.cuda.replace('.', '')}"
    else:
        accelerator = "cpu"
    return f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}_{accelerator}"


def default_root() -> Path:
    """torch's cache root for extensions (~/.cache/torch_extensions, or under $XDG_CACHE_HOME)."""
    from torch.utils.cpp_extension import get_default_build_root

    return Path(get_default_build_root())


def torch_default_dir() -> Path:
    """Where torch builds ops when TORCH_EXTENSIONS_DIR is unset: one directory for every venv of this Python."""
    return default_root() / _flavour()


def venv_extensions_dir(prefix: str | None = None) -> Path:
    """This virtualenv's own op directory: `<root>/<venv name>-<hash of its path>/py311_cpu`."""
    real = os.path.realpath(prefix or sys.prefix)
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", "_".join(Path(real).parts[-2:])).strip("_.") or "python"
    digest = hashlib.sha256(real.encode()).hexdigest()[:10]
    return default_root() / f"{name}-{digest}" / _flavour()


@dataclass(frozen=True)
class ExtensionsDir:
    path: Path
    chosen_by: str  # "TORCH_EXTENSIONS_DIR" (the user's) or "per-virtualenv default"

    def describe(self) -> str:
        if self.chosen_by == ENV_VAR:
            return f"{self.path} (set by {ENV_VAR})"
        return f"{self.path} (this virtualenv's own; set {ENV_VAR} to choose another)"


def extensions_dir(environ: MutableMapping[str, str] | None = None) -> ExtensionsDir:
    """The directory DeepSpeed's ops build in for an Ava run started with `environ` (read only)."""
    environ = os.environ if environ is None else environ
    chosen = environ.get(ENV_VAR)
    if chosen:
        return ExtensionsDir(Path(chosen), ENV_VAR)
    return ExtensionsDir(venv_extensions_dir(), "per-virtualenv default")


def use_per_venv_extensions_dir(environ: MutableMapping[str, str] | None = None) -> ExtensionsDir:
    """Set TORCH_EXTENSIONS_DIR to this venv's directory unless the user set it (empty counts as unset).

    Call it in every process that may build an op, before DeepSpeed loads one: torch reads the variable at
    each load, and the ranks of a launch are separate processes that each compute the same directory.
    An empty value would make torch build in the current directory.
    """
    environ = os.environ if environ is None else environ
    chosen = extensions_dir(environ)
    environ[ENV_VAR] = str(chosen.path)
    return chosen


@dataclass(frozen=True)
class OpLock:
    """An op's build lock, as found on disk."""

    path: Path
    quiet_s: float  # since anything in the op's directory (the lock included) last changed
    holders: tuple[int, ...]  # processes on this machine that hold it open: a build in progress

    @property
    def op(self) -> str:
        return self.path.parent.name

    @property
    def stale(self) -> bool:
        return not self.holders and self.quiet_s >= STALE_AFTER_S

    def state(self) -> str:
        if self.holders:
            return f"a build is running (process {', '.join(map(str, self.holders))} holds it)"
        if self.stale:
            return (f"stale: no process holds it and its directory has not changed for {self.quiet_s / 60:.0f} min "
                    f"(a build killed midway left it; torch would wait on it forever to load {self.op}). "
                    f"Remove it: rm {self.path}")
        return (f"no process on this machine holds it, but its directory changed {self.quiet_s:.0f} s ago: a "
                f"build on another node sharing it, or a build just killed (stale once quiet for "
                f"{STALE_AFTER_S / 60:.0f} min)")


def _quiet_s(op_dir: Path, now: float) -> float:
    newest = 0.0
    for entry in os.scandir(op_dir):
        try:
            newest = max(newest, entry.stat(follow_symlinks=False).st_mtime)
        except OSError:  # removed while we look
            continue
    return max(0.0, now - newest)


def lock_holders(paths: Iterable[Path], proc: Path = Path("/proc")) -> dict[Path, tuple[int, ...]]:
    """Processes of this machine holding each path open (those this user may inspect: its own, or all as root)."""
    wanted = {os.path.realpath(p): Path(p) for p in paths}
    found: dict[Path, list[int]] = {p: [] for p in wanted.values()}
    if not wanted or not proc.is_dir():
        return {p: tuple(v) for p, v in found.items()}
    for entry in os.scandir(proc):
        if entry.name.isdigit():
            for target in _open_files(os.path.join(entry.path, "fd")):
                if target in wanted:
                    found[wanted[target]].append(int(entry.name))
    return {p: tuple(sorted(v)) for p, v in found.items()}


def _open_files(fd_dir: str) -> list[str]:
    """What a process's descriptors point at; nothing for a process that is gone or another user's."""
    targets = []
    try:
        with os.scandir(fd_dir) as fds:
            for fd in fds:
                try:
                    targets.append(os.readlink(fd.path))
                except OSError:  # closed while we look
                    continue
    except OSError:
        return []
    return targets


def find_locks(directory: Path, depth: int = 1, now: float | None = None) -> list[OpLock]:
    """The build locks under `directory`: `<op>/lock` at depth 1, deeper for a root holding several flavours."""
    if not directory.is_dir():
        return []
    paths = sorted(p for d in range(1, depth + 1) for p in directory.glob("/".join(["*"] * d) + "/lock"))
    holders = lock_holders(paths)
    now = time.time() if now is None else now
    locks = []
    for path in paths:
        try:
            quiet = _quiet_s(path.parent, now)
        except OSError:
            continue
        if path.exists():  # not released while we looked
            locks.append(OpLock(path, quiet, holders.get(path, ())))
    return locks


def warn_about_stale_locks(directory: Path, warn: Callable[[str], None]) -> list[OpLock]:
    """Before DeepSpeed loads any op: say which locks under `directory` are not held by a build here."""
    locks = [lock for lock in find_locks(directory) if not lock.holders]
    for lock in locks:
        warn(f"ava: warning: DeepSpeed op-build lock {lock.path}: {lock.state()}")
    return locks


def wait_for_lock(path: Path, *, clock: Callable[[], float] = time.time, sleep: Callable[[float], None] = time.sleep,
                  warn: Callable[[str], None] | None = None, poll_s: float = POLL_S) -> None:
    """Wait until `path` is gone, as torch's FileBaton.wait does, but raise StaleOpLockError once it is stale."""
    first = True
    while path.exists():
        try:
            quiet = _quiet_s(path.parent, clock())
        except OSError:  # the build ended and its directory went away under us: look again
            sleep(poll_s)
            continue
        # /proc is scanned at the first look (to say so when no build here holds the lock) and whenever the
        # directory is quiet enough to be stale, not at every poll: ranks wait here through whole builds.
        if first or quiet >= STALE_AFTER_S:
            lock = OpLock(path, quiet, lock_holders([path]).get(path, ()))
            if lock.stale and path.exists():
                raise StaleOpLockError(
                    f"DeepSpeed's build of the {lock.op} op waits on the lock {path}, which no build holds: no "
                    f"process on this machine has it open and nothing in {path.parent} has changed for "
                    f"{quiet / 60:.0f} min. A build killed midway left it, and the wait would never end",
                    f"remove it (rm {path}) and start again; the op is then built once")
            if first and not lock.holders and warn is not None:
                warn(f"ava: warning: waiting on DeepSpeed op-build lock {path}: {lock.state()}")
            first = False
        sleep(poll_s)


def guard_lock_waits(warn: Callable[[str], None] | None = None) -> None:
    """Make torch's op builds raise StaleOpLockError on a stale lock instead of waiting on it forever.

    torch.utils.cpp_extension creates its `FileBaton` by the module-global name; the subclass installed there
    changes only what a waiting process does, not how a build takes or releases the lock.
    """
    from torch.utils import cpp_extension
    from torch.utils.file_baton import FileBaton

    if getattr(cpp_extension.FileBaton, "ava_guarded", False):
        return
    say = warn or (lambda text: print(text, file=sys.stderr, flush=True))

    class GuardedFileBaton(FileBaton):
        ava_guarded = True

        def wait(self) -> None:
            wait_for_lock(Path(self.lock_file_path), warn=say)

    cpp_extension.FileBaton = GuardedFileBaton  # type: ignore[misc]


def prepare_op_builds(environ: MutableMapping[str, str] | None = None,
                      warn: Callable[[str], None] | None = None) -> ExtensionsDir:
    """What a training process does before DeepSpeed builds or loads an op: its directory, the lock guard, warnings.

    The warnings about locks found at the start come from each node's first rank only (its ranks share the
    directory); a rank that then waits on a stale lock raises StaleOpLockError itself.
    """
    environ = os.environ if environ is None else environ
    say = warn or (lambda text: print(text, file=sys.stderr, flush=True))
    chosen = use_per_venv_extensions_dir(environ)
    guard_lock_waits(say)
    if environ.get("LOCAL_RANK", "0") == "0":
        warn_about_stale_locks(chosen.path, say)
    return chosen
