"""When a rank dies mid-run, the survivors say which one, instead of a gloo/NCCL traceback.

A rank killed by the out-of-memory killer, a SIGKILL or a crash leaves its
peers blocked in a collective that then fails with "Connection reset by peer"
or "Connection closed by peer" (gloo), or an aborted NCCL communicator.
That message names a socket, not a rank. So at start-up every rank shares its
host and process id (`Peers.gather`), and when a collective fails that way,
each survivor checks which of the processes on its own host are gone and
reports them by rank, with the checkpoint the run can resume from.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

from ava.train.runtime.rendezvous import LaunchError

# Fragments of the errors torch.distributed raises when a peer process disappears (gloo and NCCL).
_LOST_PEER = ("connection reset by peer", "connection closed by peer", "broken pipe", "connection refused",
              "communicator was aborted", "remote process exited", "socket timeout", "nccl watchdog")


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

    def dead_on_this_host(self) -> list[int]:
        """Ranks on this host whose process no longer runs."""
        host = socket.gethostname()
        return [rank for rank, (where, pid) in enumerate(self.processes) if where == host and not _alive(pid)]

    def elsewhere(self) -> list[int]:
        host = socket.gethostname()
        return [rank for rank, (where, _) in enumerate(self.processes) if where != host]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    try:  # a killed child not yet reaped by the launcher is a zombie: gone for our purposes
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


def is_lost_peer(exc: BaseException) -> bool:
    """Whether `exc` is a collective failing because another process went away."""
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(fragment in text for fragment in _LOST_PEER)


def lost_rank_error(exc: BaseException, peers: Peers, rank: int, resume_hint: str) -> LostRankError:
    """The one-paragraph account of a lost rank, for the survivors to print."""
    dead = [r for r in peers.dead_on_this_host() if r != rank]
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
