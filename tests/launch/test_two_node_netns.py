"""Two nodes without a cluster: one deepspeed launcher per network namespace, as train.sbatch starts them.

Namespace 0 and namespace 1 (tests/launch/netns.py) each run
`deepspeed --no_ssh --hostfile H --num_nodes 2 --num_gpus 1 --node_rank R
--master_addr 10.231.X.1 --master_port P train.py ...`, the command
launch/slurm/train.sbatch runs on each node. The namespaces reach each other
only over the veth addresses, so the rendezvous and every gloo collective go
over a real interface, not 127.0.0.1. The run must give exactly the per-step
losses of `deepspeed --num_gpus 2` on one node (same world size, same batch
plan, same seed).

What this pins about DeepSpeed 0.19 on CPU:
- `--no_ssh` with `--num_nodes 2` needs a hostfile listing the nodes (without one
  the runner takes localhost only, forces master 127.0.0.1 and refuses
  `--num_nodes > 1`); with `--no_ssh` its host names are only labels: each node
  starts the ranks of its own `--node_rank`.
- gloo advertises the address its host name resolves to, often 127.0.0.1 (here and
  on many clusters' /etc/hosts): the peer then dials its own loopback and fails
  with "Connection refused". `GLOO_SOCKET_IFNAME=<interface>` picks the interface.
- DeepSpeed's shared-memory all-reduce (/dev/shm) is used only when every rank is
  on one node (LOCAL_SIZE == WORLD_SIZE); with one rank per node it is never set
  up, and training collectives go through gloo in any case.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.launch.netns import NetnsUnavailable, TwoNodeNetwork, two_node_network
from tests.train.run_helpers import TINY, free_port, run_env
from tests.train.test_loss_agreement import COMMON, STEPS

pytestmark = pytest.mark.slow

FLAGS = [*TINY, *COMMON, "--num_experts", "0", "--mixed_precision", "fp32",
         "--distributed_config", "configs/distributed/deepspeed_zero2.yaml", "--deepspeed.train_batch_size", "8"]
TIMEOUT_S = 300
SHM_PREFIX = "deepspeed_allreduce_buffer"
SHM_BUILT = "deepspeed_shm_comm_op built successfully"
LOCK_HINT = ("a launch that never reaches its first step may be waiting on a DeepSpeed op-build lock: "
             "`ava doctor --no_launch` lists them (under ~/.cache/torch_extensions/<venv>-<hash>/py*_cpu/) "
             "and names the stale ones")
# The start-up line train.py prints on every rank of a multi-rank run (ava.train.runtime.rendezvous).
STARTUP = re.compile(r"^ava: rank (\d+)/(\d+) \(local (\d+)\).*master ([\d.]+):(\d+)", re.MULTILINE)


def _launcher() -> str:
    launcher = Path(sys.executable).with_name("deepspeed")
    if not launcher.exists():
        pytest.fail("the deepspeed launcher is not installed next to this Python; run `make setup`")
    return str(launcher)


def _losses(out: Path) -> list[float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def _shm_buffers(port: str) -> set[str]:
    return {p.name for p in Path("/dev/shm").glob(f"{SHM_PREFIX}_*_{port}_*")}


def _wait(procs: list[subprocess.Popen], logs: list[Path], port: str) -> set[str]:
    """Wait for every launcher; stop them all as soon as one fails. Returns the shm buffers seen meanwhile."""
    seen: set[str] = set()
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while any(p.poll() is None for p in procs):
            seen |= _shm_buffers(port)
            if any(p.returncode not in (None, 0) for p in procs) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        for p in procs:  # each launcher leads its own session: its ranks go with it
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    if any(p.returncode != 0 for p in procs):
        shown = "\n".join(f"--- {log.name} (exit {p.returncode}):\n{log.read_text()[-4000:]}"
                          for p, log in zip(procs, logs, strict=True))
        timed_out = " (timed out)" if time.monotonic() > deadline else ""
        pytest.fail(f"a launch failed{timed_out}; {LOCK_HINT}\n{shown}")
    return seen


def _single_node(tmp: Path) -> tuple[list[float], set[str], str]:
    port = free_port()
    log = tmp / "single-node.log"
    command = [_launcher(), "--num_gpus", "2", "--master_port", port, "train.py", *FLAGS,
               "--output_dir", str(tmp / "single"), "--num_gpus", "2"]
    with log.open("w") as sink:
        proc = subprocess.Popen(command, cwd=REPO, env=run_env(), stdout=sink, stderr=subprocess.STDOUT,
                                start_new_session=True)
        seen = _wait([proc], [log], port)
    return _losses(tmp / "single"), seen, log.read_text()


def _two_nodes(net: TwoNodeNetwork, tmp: Path) -> tuple[list[float], list[str], set[str], str]:
    port = free_port()
    master = net.nodes[0].address
    hostfile = tmp / "hostfile"  # --no_ssh: only the slot counts and the node order matter
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    out = tmp / "two"  # one output directory, as on a cluster's shared file system
    procs, logs = [], []
    for rank, node in enumerate(net.nodes):
        env = {**run_env(), "GLOO_SOCKET_IFNAME": node.interface}
        argv = [_launcher(), "--hostfile", str(hostfile), "--no_ssh", "--num_nodes", "2", "--num_gpus", "1",
                "--node_rank", str(rank), "--master_addr", master, "--master_port", port,
                "train.py", *FLAGS, "--output_dir", str(out), "--num_gpus", "1", "--num_nodes", "2"]
        logs.append(tmp / f"node{rank}.log")
        with logs[-1].open("w") as sink:
            procs.append(subprocess.Popen(net.command(rank, argv), cwd=REPO, env=env, stdout=sink,
                                          stderr=subprocess.STDOUT, start_new_session=True))
    seen = _wait(procs, logs, port)
    return _losses(out), [log.read_text() for log in logs], seen, port


@pytest.fixture
def network():
    if sys.platform != "linux":
        pytest.skip("network namespaces are Linux-only")
    try:
        with two_node_network() as net:
            yield net
    except NetnsUnavailable as exc:
        pytest.skip(f"cannot build two network namespaces here, so no two-node run: {exc}")
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not [node.namespace for node in net.nodes if node.namespace in left], left


def test_two_nodes_over_veth_follow_the_single_node_loss_trajectory(network, tmp_path):
    reference, single_shm, single_log = _single_node(tmp_path)
    losses, logs, two_node_shm, port = _two_nodes(network, tmp_path)
    master = network.nodes[0].address

    assert len(reference) == STEPS and min(reference[1:]) < reference[0] - 0.02, reference
    assert losses == reference, f"2 nodes x 1 rank: {losses}\n1 node x 2 ranks: {reference}"

    # each namespace's launcher ran its own node rank, both against the veth master
    for rank, log in enumerate(logs):
        assert f"nnodes=2, num_local_procs=1, node_rank={rank}" in log, log[-3000:]
        assert f"--master_addr={master} --master_port={port} --node_rank={rank}" in log, log[-3000:]
    startup = [m.groups() for log in logs for m in STARTUP.finditer(log)]
    assert sorted((rank, world, master_addr, master_port) for rank, world, _, master_addr, master_port in startup) == [
        ("0", "2", master, port), ("1", "2", master, port)], startup
    assert not master.startswith("127.")

    # the shm all-reduce is set up when both ranks share a node, and never across the two namespaces
    if SHM_BUILT in single_log:  # the op needs a C++ compiler; without it DeepSpeed goes without
        assert single_shm, "the single-node run never created DeepSpeed's shm all-reduce buffers"
    assert not two_node_shm, f"shared-memory all-reduce buffers across namespaces: {sorted(two_node_shm)}"
    assert not _shm_buffers(port)
