"""A dead rank is named by the survivors, from the process ids the ranks shared at start-up."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from ava.train.runtime.lost_rank import Peers, is_lost_peer, lost_rank_error


def test_collective_errors_from_a_vanished_peer_are_recognised() -> None:
    assert is_lost_peer(RuntimeError("[../gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:34026: "
                                     "Connection reset by peer. This is typically caused by ..."))
    assert is_lost_peer(RuntimeError("NCCL communicator was aborted on rank 0."))
    assert not is_lost_peer(RuntimeError("CUDA out of memory"))
    assert not is_lost_peer(ValueError("Connection reset by peer"))  # not from a collective


def test_the_dead_rank_is_named_with_its_pid_and_the_resume_hint() -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    peers = Peers(((socket.gethostname(), os.getpid()), (socket.gethostname(), gone.pid)))
    error = lost_rank_error(RuntimeError("[pair.cc:537] Read error [127.0.0.1]:1: Connection reset by peer. More"),
                            peers, 0, "continue with --output_dir RUN --resume")
    assert str(error).startswith(f"rank 1 (pid {gone.pid} on {socket.gethostname()}) stopped during training")
    assert "(Read error [127.0.0.1]:1: Connection reset by peer)" in str(error)
    assert error.fix.endswith("continue with --output_dir RUN --resume")


def test_ranks_on_other_hosts_are_listed_as_unchecked() -> None:
    peers = Peers(((socket.gethostname(), os.getpid()), ("node-b.invalid", 12345)))
    error = lost_rank_error(RuntimeError("Connection closed by peer"), peers, 0, "resume")
    assert str(error).startswith("lost contact with another rank during training (ranks 1 run on other hosts")
