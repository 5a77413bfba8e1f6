"""Process-group setup for DeepSpeed, with or without a launcher.

`deepspeed train.py` and torchrun export RANK/WORLD_SIZE/MASTER_*, `srun`
exports SLURM's variables (`ava.train.runtime.rendezvous` turns them into the same),
and a plain `python train.py` exports nothing: a one-process group on
localhost. Several ranks first meet in a rendezvous with a deadline, so a
wrong master or world size fails in seconds. gloo on CPU
(DS_ACCELERATOR=cpu), nccl on GPUs.

A run's ranks also end together (`RankWatch`): an error one rank meets on
its own (a reward function raising there, its disk full, a bug) would leave
the others waiting in their next collective, and a rank that dies leaves
them with a socket error. The failing rank writes its error on the
rendezvous store before it leaves the process group, and every other rank
ends within seconds saying `rank N failed: <that error>`; a rank that died
without a word is named by `ava.train.runtime.lost_rank`.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ava.errors import UserError
from ava.train.runtime.lost_rank import LostRankError, Peers, is_lost_peer, lost_rank_error


@dataclass(frozen=True)
class ProcessInfo:
    rank: int
    world_size: int
    local_rank: int
    # The rendezvous store (a TCPStore that rank 0 serves), held for as long as the run: the ranks tell each
    # other about a failure there, after the process group is gone. None for one process.
    store: Any = field(default=None, compare=False, repr=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> ProcessInfo:
    """Initialise torch.distributed through DeepSpeed (once) and describe this process."""
    import deepspeed
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    from ava.train.runtime.rendezvous import discover, export, rendezvous, timeout_seconds
    from ava.train.runtime.threads import set_rank_threads

    env = discover(os.environ)
    if "RANK" not in os.environ:  # no launcher: a group of one
        export(env, os.environ)
    set_rank_threads(os.environ, print_note=env.rank == 0)  # before any compute: ranks sharing cores must not spin
    store = None
    if not dist.is_initialized():
        backend = "gloo" if get_accelerator().device_name() == "cpu" else get_accelerator().communication_backend_name()
        if env.world_size > 1:
            store = rendezvous(env, timeout_seconds(os.environ))
            dist.init_process_group(backend, store=store, rank=env.rank, world_size=env.world_size)
        deepspeed.init_distributed(dist_backend=backend, verbose=False)
    return ProcessInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), store)


SHM_DIR = "/dev/shm"


def release_shared_memory(rank: int, master_addr: str | None = None, master_port: str | None = None) -> list[str]:
    """Unlink the shared-memory all-reduce buffer DeepSpeed's CPU backend created for this rank.

    DeepSpeed's shm comm op (CPU accelerator) creates one ~70 MB file per rank in
    /dev/shm named after MASTER_ADDR/MASTER_PORT and never removes it, so every
    multi-rank CPU run would leak RAM until the machine thrashes. Called once the
    process group is destroyed; other ranks that still map the file keep their
    mapping (POSIX unlink semantics). Returns the paths removed.
    """
    addr = master_addr or os.environ.get("MASTER_ADDR")
    port = master_port or os.environ.get("MASTER_PORT")
    if not addr or not port or not os.path.isdir(SHM_DIR):
        return []
    suffix = f"_{addr}_{port}_{rank}"
    removed = []
    for name in os.listdir(SHM_DIR):
        if name.startswith("deepspeed_allreduce_buffer") and name.endswith(suffix):
            try:
                os.unlink(os.path.join(SHM_DIR, name))
                removed.append(os.path.join(SHM_DIR, name))
            except FileNotFoundError:
                pass
    return removed


def leave_process_group() -> None:
    """Destroy the process group (gloo's threads can abort an exit that skips it), then free this rank's shm buffer."""
    import torch.distributed as dist

    if dist.is_initialized():
        rank = dist.get_rank()
        dist.destroy_process_group()
        release_shared_memory(rank)


def exit_launched_worker(status: int = 0) -> None:
    """End a launcher-started worker script as train.py ends a rank: leave the group, flush, skip the teardown.

    The interpreter's teardown can abort (-6) on threads gloo and DeepSpeed
    leave behind, after the work has fully succeeded; see `ava.cli.main`.
    """
    import sys

    leave_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


FAILURE_KEY = "ava/failure/first"  # the first failure a rank announced (later ones keep theirs to themselves)
DONE_KEY = "ava/failure/done"  # how many ranks have finished with the store after a failure
POLL_S = 1.0  # how often a rank looks for another rank's failure
GRACE_S = 5.0  # once another rank failed, how long the main thread gets to end on its own before the watch thread ends it
ANNOUNCE_WAIT_S = 1.0  # how long a rank whose collective broke waits for the failing rank's announcement
LEAVE_WAIT_S = 15.0  # how long rank 0, which serves the store, waits for the others to have read a failure


class RankFailedError(LostRankError):
    """Another rank failed with an error (named in the message); this rank cannot go on without it."""


@dataclass(frozen=True)
class Failure:
    """What one rank failed with, as the other ranks read it from the store."""

    rank: int
    error: str  # a user error's message, or a bug's type and first line
    fix: str | None  # a user error's fix; None for a bug, whose traceback is in that rank's own output

    @classmethod
    def of(cls, rank: int, exc: BaseException) -> Failure:
        if isinstance(exc, UserError):
            message, fix = getattr(exc, "message", "") or str(exc), getattr(exc, "fix", "")
            return cls(rank, message[:4000], fix[:2000] or f"rank {rank}'s own message, above in the job's output, "
                       "says what to change")
        first_line = (str(exc).strip().splitlines() or [""])[0][:500]
        return cls(rank, f"{type(exc).__name__}: {first_line}" if first_line else type(exc).__name__, None)

    def encode(self) -> str:
        return json.dumps({"rank": self.rank, "error": self.error, "fix": self.fix})

    @classmethod
    def decode(cls, raw: bytes) -> Failure:
        value = json.loads(raw)
        return cls(int(value["rank"]), str(value["error"]), value["fix"])

    def for_other_ranks(self, resume_hint: str) -> RankFailedError:
        """The paragraph every other rank prints: which rank failed, its error, and the fix."""
        fix = self.fix or (f"rank {self.rank}'s traceback, above in the job's output, shows where it failed (an "
                           f"error that is not a user error is a bug: report it with that traceback); then {resume_hint}")
        return RankFailedError(f"rank {self.rank} failed: {self.error}", fix)


class RankWatch:
    """Ends every rank of a run within seconds when one of them cannot go on, naming that rank and its error.

    `start` (collective) shares each rank's host and process id (for
    `lost_rank`) and starts a thread that looks for another rank's failure
    on the store every second. A run calls `account(exc)` with any exception
    that escapes it and raises what it returns, and calls `leave()` when it
    is done, in all cases:

    - the rank whose own error it is announces it (the first announcement
      is kept) and, for a user error, prints it itself (`every_rank`);
    - the others' collectives break when that rank's process exits (gloo;
      destroying its process group is not enough): each raises
      `RankFailedError` ("rank N failed: ...") with the announcement, or,
      finding none, `lost_rank_error` (the rank died without a word);
    - rank 0 serves the store, so when it is the one that failed, `leave()`
      waits (at most `LEAVE_WAIT_S`) until the others' watch threads have
      read the announcement, and only then exits;
    - a rank whose main thread does not come back within `GRACE_S` of
      reading another rank's failure (a collective that waits for its own
      timeout, as NCCL's does) is ended by its watch thread, with the same
      message.
    """

    def __init__(self, process: ProcessInfo, peers: Peers | None, resume_hint: Callable[[], str]) -> None:
        self.process, self.peers, self.resume_hint = process, peers, resume_hint
        self.store = process.store if peers is not None else None
        self.failed = False  # this rank announced a failure of its own
        self._done = False
        self._unreachable = False  # a request to the store failed: rank 0 is gone
        self._seen: Failure | None = None  # another rank's failure, as the watch thread read it
        self._taken_over = threading.Event()  # the main thread is handling the failure, or the run ended
        self._thread: threading.Thread | None = None

    @classmethod
    def start(cls, process: ProcessInfo, resume_hint: Callable[[], str], peers: Peers | None = None) -> RankWatch:
        """Collective when there are several ranks: every rank must call it once the process group is up.

        `resume_hint` says how to continue the run from what it wrote (read when a failure is reported);
        `peers`, when given, replaces gathering them.
        """
        if peers is None and process.world_size > 1:
            peers = Peers.gather()
        watch = cls(process, peers, resume_hint)
        if watch.store is not None:
            watch._thread = threading.Thread(target=watch._watch, name="ava-rank-watch", daemon=True)
            watch._thread.start()
        return watch

    def account(self, exc: BaseException) -> BaseException:
        """The exception this rank should end with, given `exc` escaped its run (see the class docstring)."""
        self._stop_watching()
        if self.peers is None or isinstance(exc, LostRankError | KeyboardInterrupt):
            return exc  # a second Ctrl-C reaches every rank of the terminal's process group: nothing to announce
        rank = self.process.rank
        if is_lost_peer(exc):
            failure = self._seen or self._read(wait=ANNOUNCE_WAIT_S)
            self._finish()
            if failure is not None and failure.rank != rank:
                return failure.for_other_ranks(self.resume_hint())
            return lost_rank_error(exc, self.peers, rank, self.resume_hint())
        mine = Failure.of(rank, exc)
        first = self._announce(mine)
        self.failed = True
        self._finish()
        if isinstance(exc, UserError) and (first.rank == rank or first.error != mine.error):
            # Met on this rank alone (or differing from the first rank's): this rank must say it, not only rank 0.
            exc.every_rank = True
        return exc

    def leave(self) -> None:
        """Leave the process group; after this rank's own failure, rank 0 first lets the others read it."""
        self._stop_watching()
        leave_process_group()
        if not (self.failed and self.process.rank == 0 and self.store is not None):
            return
        deadline = time.monotonic() + LEAVE_WAIT_S
        while time.monotonic() < deadline and self._count_done() < self.process.world_size:
            if self.peers is not None and not self.peers.elsewhere() and \
                    len(self.peers.dead_on_this_host()) == self.process.world_size - 1:
                return  # nobody left to read it
            time.sleep(0.05)

    def _watch(self) -> None:
        while not self._taken_over.wait(POLL_S):
            failure = self._read()
            if failure is None or failure.rank == self.process.rank:
                continue
            # Read: rank 0 may go (when it is the one that failed, it waits for that), and its leaving is what
            # breaks this rank's collective (gloo): a process group destroyed in a live process breaks nothing.
            self._seen = failure
            self._finish()
            if self._taken_over.wait(GRACE_S):
                return  # the main thread's collective broke and it is reporting the failure itself
            # The main thread is still blocked (a collective that waits for its timeout, e.g. NCCL's): end here.
            from ava.secrets import redact_text, secret_values

            error = failure.for_other_ranks(self.resume_hint())
            print(redact_text(f"error (rank {self.process.rank}): {error}", secret_values()), file=sys.stderr,
                  flush=True)
            self._finish()
            os._exit(2)

    def _stop_watching(self) -> None:
        self._taken_over.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=POLL_S + 1)

    def _ask(self, op: Callable[[Any], Any]) -> Any:
        """`op(store)`, or None when the store cannot answer: one process, or rank 0 (which serves it) gone.

        Once a request fails the store is not asked again: every failed request prints a C++ trace.
        """
        if self.store is None or self._unreachable or (self.peers is not None and 0 in self.peers.dead_on_this_host()):
            return None
        try:
            return op(self.store)
        except Exception:
            self._unreachable = True
            return None

    def _read(self, wait: float = 0.0) -> Failure | None:
        """The first failure announced on the store, waiting up to `wait` seconds for one; None if none."""
        deadline = time.monotonic() + wait
        while True:
            raw = self._ask(lambda store: store.get(FAILURE_KEY) if store.check([FAILURE_KEY]) else None)
            if raw is not None:
                return Failure.decode(raw)
            if time.monotonic() >= deadline or self._unreachable:
                return None
            time.sleep(0.05)

    def _announce(self, failure: Failure) -> Failure:
        """Write `failure` on the store unless another rank's came first; the one kept."""
        first = self._ask(lambda store: store.compare_set(FAILURE_KEY, "", failure.encode()))
        return Failure.decode(first) if first is not None else failure

    def _finish(self) -> None:
        """Count this rank among those done with the store (once)."""
        if not self._done:
            self._done = True
            self._ask(lambda store: store.add(DONE_KEY, 1))

    def _count_done(self) -> int:
        done = self._ask(lambda store: store.add(DONE_KEY, 0))
        return int(done) if done is not None else self.process.world_size
