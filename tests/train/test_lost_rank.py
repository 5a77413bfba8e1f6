"""A dead rank is named by the survivors, from the process ids the ranks shared at start-up."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

from ava.train.runtime import lost_rank
from ava.train.runtime.lost_rank import Peers, exiting, is_lost_peer, lost_rank_error

GLOO_RESET = RuntimeError("[pair.cc:537] Read error [127.0.0.1]:1: Connection reset by peer. More")


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


def test_a_peer_still_exiting_when_the_collective_fails_is_waited_for_and_named() -> None:
    # On a busy machine the survivor can look before the dying peer is scheduled again to finish its exit.
    slow = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1.5)"])
    try:
        peers = Peers(((socket.gethostname(), os.getpid()), (socket.gethostname(), slow.pid)))
        started = time.monotonic()
        error = lost_rank_error(GLOO_RESET, peers, 0, "resume")
        assert str(error).startswith(f"rank 1 (pid {slow.pid} on {socket.gethostname()}) stopped during training")
        assert time.monotonic() - started < lost_rank.EXIT_WAIT_S  # named as soon as it was gone (a zombie here)
    finally:
        slow.kill()
        slow.wait()


_DIES_AFTER_CONNECTING = """
import os, signal, socket, sys, threading, time
ballast = b"\\1" * (200 << 20)  # memory to give back: a real rank's exit takes a while
for _ in range(4):
    threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
peer = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
peer.recv(1)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_killed_peer_is_named_the_moment_its_socket_closes(monkeypatch: pytest.MonkeyPatch) -> None:
    # Its sockets close before it is a zombie: "R" in /proc, but already exiting (PF_EXITING). Without waiting,
    # the old zombie-only check missed about one kill in five even on an idle machine.
    monkeypatch.setattr(lost_rank, "EXIT_WAIT_S", 0.0)
    with socket.create_server(("127.0.0.1", 0)) as server:
        for _ in range(8):
            peer = subprocess.Popen([sys.executable, "-c", _DIES_AFTER_CONNECTING, str(server.getsockname()[1])])
            connection, _ = server.accept()
            with connection:
                connection.send(b"x")
                try:
                    assert connection.recv(1) == b""
                except ConnectionResetError:
                    pass
                peers = Peers(((socket.gethostname(), os.getpid()), (socket.gethostname(), peer.pid)))
                error = lost_rank_error(GLOO_RESET, peers, 0, "resume")
            peer.wait()
            assert str(error).startswith(f"rank 1 (pid {peer.pid} on "), str(error)


def test_a_peer_that_stays_alive_is_waited_for_only_so_long(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lost_rank, "EXIT_WAIT_S", 0.3)
    peers = Peers(((socket.gethostname(), os.getpid()), (socket.gethostname(), os.getppid())))
    started = time.monotonic()
    error = lost_rank_error(GLOO_RESET, peers, 0, "resume")
    assert str(error).startswith("lost contact with another rank during training, so")
    assert 0.3 <= time.monotonic() - started < 5


def test_proc_stat_tells_an_exiting_process_and_a_zombie_from_a_running_one() -> None:
    running = "4242 (python -c x) S 1 4242 4242 0 -1 4194560 2048 0 0 0"
    assert not exiting(running)
    assert exiting("4242 (python -c x) R 1 4242 4242 0 -1 4195340 2048 0 0 0")  # 0x40040c: PF_EXITING set
    assert exiting("4242 (python) Z 1 4242 4242 0 -1 4227084 2048 0 0 0")
    assert exiting("4242 (a) b) X 1 4242 4242 0 -1 0 0 0 0 0")  # the name may hold ") "
    assert not exiting("4242 (short")  # unreadable: not evidence of an exit
