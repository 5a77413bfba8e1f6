"""When a rank dies mid-run, the survivors say which one, instead of a gloo/NCCL traceback.

A rank killed by the out-of-memory killer, a SIGKILL or a crash leaves its
peers blocked in a collective that then fails with "Connection reset by peer"
or "Connection closed by peer" (gloo), or an aborted NCCL communicator.
That message names a socket, not a rank. So at start-up every rank shares its
host and process id (`Peers.gather`), and when a collective fails that way,
each survivor checks which of the processes on its own host are gone and
reports them by rank, with the checkpoint the run can resume from.

A dying process closes its sockets before it is a zombie, so a survivor can
meet the broken collective while the peer still looks alive ("R" in /proc):
a survivor that looked at once missed about one SIGKILL in five, the window
lasting up to 12 ms on a loaded 2-core machine, longer the busier it is. A
process that has begun to exit (the kernel's PF_EXITING) therefore counts as
gone, and a survivor that finds no peer gone yet waits for one
(`EXIT_WAIT_S`) before it settles for "lost contact".
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from ava.train.runtime.rendezvous import LaunchError

# Fragments of the errors torch.distributed raises when a peer process disappears (gloo and NCCL).
_LOST_PEER = ("connection reset by peer", "connection closed by peer", "broken pipe", "connection refused",
              "communicator was aborted", "remote process exited", "socket timeout", "nccl watchdog")


# How long a survivor waits for a peer's death to show when every rank runs on this host: one of them left, so
# it is only a matter of the dying process being scheduled. Far below the 30 s the deepspeed launcher gives
# the others between its SIGTERM and its SIGKILL, so the message is out before they are killed.
EXIT_WAIT_S = 10.0
# With ranks on other hosts the lost one may be there, out of sight: a short wait, not to delay the message.
EXIT_WAIT_ELSEWHERE_S = 1.0
_POLL_S = 0.05
PF_EXITING = 0x4  # include/linux/sched.h: the task has begun to exit (/proc/<pid>/stat field 9, flags)


class LostRankError(LaunchError):
    """Another rank of the job died; this rank cannot go on without it."""


@dataclass(frozen=True)
class Peers:
    """Host and process id of every rank, in rank order."""

    processes: tuple[tuple[str, int], ...]

    @classmethod
    def gather(cls) -> Peers:
        """Collective: every rank must call it once the process group is up."""
        import torch.distributed as dist

        mine = (socket.gethostname(), os.getpid())
        everyone: list[tuple[str, int] | None] = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
        return cls(tuple(p for p in everyone if p is not None))

    def dead_on_this_host(self, wait_s: float = 0.0) -> list[int]:
        """Ranks on this host whose process no longer runs (or has begun to exit).

        With `wait_s`, waits up to that long for at least one to be gone (see the module docstring).
        """
        host = socket.gethostname()
        deadline = time.monotonic() + wait_s
        while True:
            dead = [rank for rank, (where, pid) in enumerate(self.processes) if where == host and not _alive(pid)]
            if dead or time.monotonic() >= deadline:
                return dead
            time.sleep(_POLL_S)

    def elsewhere(self) -> list[int]:
        host = socket.gethostname()
        return [rank for rank, (where, _) in enumerate(self.processes) if where != host]


def _alive(pid: int) -> bool:
    """Whether process `pid` runs and has not begun to exit."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else: /proc still says whether it is exiting
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # no /proc (not Linux): kill() said it exists (if just reaped, the next look sees it gone)
        return True
    return not exiting(stat)


def exiting(stat: str) -> bool:
    """Whether a /proc/<pid>/stat line shows a process exiting, or exited and not yet reaped (a zombie).

    A killed child the launcher has not reaped yet is a zombie; before that it
    is exiting (PF_EXITING) from the moment it took the signal, which is
    before it closes its sockets and its peers' collectives fail.
    """
    fields = stat.rsplit(")", 1)[-1].split()  # the name, in parentheses, may hold spaces
    try:
        state, flags = fields[0], int(fields[6])
    except (IndexError, ValueError):
        return False
    return state in ("Z", "X", "x") or bool(flags & PF_EXITING)


def is_lost_peer(exc: BaseException) -> bool:
    """Whether `exc` is a collective failing because another process went away."""
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(fragment in text for fragment in _LOST_PEER)


def lost_rank_error(exc: BaseException, peers: Peers, rank: int, resume_hint: str) -> LostRankError:
    """The one-paragraph account of a lost rank, for the survivors to print."""
    host = socket.gethostname()
    neighbours = [r for r, (where, _) in enumerate(peers.processes) if where == host and r != rank]
    wait = 0.0 if not neighbours else EXIT_WAIT_ELSEWHERE_S if peers.elsewhere() else EXIT_WAIT_S
    dead = [r for r in peers.dead_on_this_host(wait) if r != rank]
    first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    cause = first_line.split("] ", 1)[-1].split(". ")[0][:160]
    if dead:
        who = ", ".join(f"rank {r} (pid {peers.processes[r][1]} on {peers.processes[r][0]})" for r in dead)
        what = f"{who} stopped during training: its process is gone"
    else:
        others = peers.elsewhere()
        what = ("lost contact with another rank during training" + (
            f" (ranks {', '.join(map(str, others))} run on other hosts, which cannot be checked from here)"
            if others else ""))
    return LostRankError(
        f"{what}, so this rank's collective failed ({cause}) and the job cannot go on",
        "read that rank's own last lines: an `error` there says why it stopped; none means it was killed (the "
        f"launcher's exit code -9 is SIGKILL, often the out-of-memory killer). Then {resume_hint}")
