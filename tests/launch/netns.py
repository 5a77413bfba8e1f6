"""Two network namespaces joined by a veth pair: two "nodes" on one machine.

Each namespace has its own loopback and one end of the veth pair, so a
process started in namespace 0 can reach a process in namespace 1 only over
the veth addresses (10.231.X.1 and 10.231.X.2), never over 127.0.0.1: a
rendezvous that works here goes over a real interface, as on two machines.
The file system, /dev/shm and the host name stay shared.

Needs root (CAP_NET_ADMIN) and iproute2's `ip`; `two_node_network()` raises
`NetnsUnavailable` with the reason when the machine does not allow it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass


class NetnsUnavailable(RuntimeError):
    """This machine cannot create network namespaces (not root, no `ip`, a container without CAP_NET_ADMIN)."""


@dataclass(frozen=True)
class Node:
    namespace: str
    interface: str  # this node's end of the veth pair
    address: str  # its IPv4 address, without the prefix length


@dataclass(frozen=True)
class TwoNodeNetwork:
    nodes: tuple[Node, Node]

    def command(self, node: int, argv: Sequence[str]) -> list[str]:
        """`argv` run inside node `node`'s namespace (`ip netns exec` keeps the caller's environment)."""
        return ["ip", "netns", "exec", self.nodes[node].namespace, *argv]


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)


def _must(*args: str) -> None:
    result = _ip(*args)
    if result.returncode != 0:  # e.g. no veth support in this kernel or sandbox
        raise NetnsUnavailable(f"`ip {' '.join(args)}` failed: {result.stderr.strip()}")


def _remove_leftovers() -> None:
    """Namespaces of earlier runs that were killed before their cleanup (their process is gone)."""
    listing = _ip("netns", "list").stdout
    for name, pid in re.findall(r"^(ava-n[01]-(\d+))\b", listing, flags=re.MULTILINE):
        if not os.path.exists(f"/proc/{pid}"):
            _ip("netns", "del", name)


@contextmanager
def two_node_network(tag: str | None = None) -> Iterator[TwoNodeNetwork]:
    """Create namespaces ava-n0-TAG and ava-n1-TAG joined by a veth pair; remove them afterwards, even on failure.

    TAG defaults to this process id, so concurrent test runs never share names.
    Deleting a namespace also deletes the veth end inside it (and so the pair).
    """
    tag = tag or str(os.getpid())
    if shutil.which("ip") is None:
        raise NetnsUnavailable("iproute2's `ip` is not installed")
    _remove_leftovers()
    subnet = 1 + int(tag) % 250 if tag.isdigit() else 231
    nodes = (Node(f"ava-n0-{tag}", f"avv0-{tag}"[:15], f"10.231.{subnet}.1"),
             Node(f"ava-n1-{tag}", f"avv1-{tag}"[:15], f"10.231.{subnet}.2"))
    probe = _ip("netns", "add", nodes[0].namespace)
    if probe.returncode != 0:
        raise NetnsUnavailable(f"`ip netns add` is not permitted here: {probe.stderr.strip()}")
    created = [nodes[0].namespace]
    try:
        _must("netns", "add", nodes[1].namespace)
        created.append(nodes[1].namespace)
        _must("link", "add", nodes[0].interface, "type", "veth", "peer", "name", nodes[1].interface)
        for node in nodes:
            _must("link", "set", node.interface, "netns", node.namespace)
            _must("-n", node.namespace, "addr", "add", f"{node.address}/24", "dev", node.interface)
            _must("-n", node.namespace, "link", "set", "lo", "up")
            _must("-n", node.namespace, "link", "set", node.interface, "up")
        yield TwoNodeNetwork(nodes)
    finally:
        for namespace in created:
            _ip("netns", "del", namespace)
        _ip("link", "del", nodes[0].interface)  # only left if the move into a namespace failed
