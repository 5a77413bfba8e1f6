"""Who this process is in the job, and a rendezvous that fails in seconds with a reason instead of hanging.

Rank, world size and master come from the first of:
- the `deepspeed` launcher or torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT);
- SLURM alone, inside an `srun` step (SLURM_PROCID, SLURM_STEP_NUM_TASKS or SLURM_NTASKS,
  SLURM_LOCALID; the master is the first host of SLURM_JOB_NODELIST and the port is derived
  from SLURM_JOB_ID, so two jobs on one node never collide);
- nothing: one process.

Before the process group forms, every rank meets the others on a TCP store at
the master with a deadline (`AVA_RENDEZVOUS_TIMEOUT`, default 45 s): an
unreachable master, a port in use, two processes claiming one rank, or ranks
started with different world sizes each end the run with a message naming the
problem, where torch's own init would wait for its 30-minute timeout.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import time
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from ava.errors import UserError

SLURM_PORT_BASE = 10000
SLURM_PORT_SPAN = 20000  # ports 10000-29999: below Linux's ephemeral range
DEFAULT_TIMEOUT_S = 45.0
TIMEOUT_VAR = "AVA_RENDEZVOUS_TIMEOUT"


class LaunchError(UserError):
    """The launch environment is inconsistent or the ranks cannot meet."""


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    source: str  # "deepspeed launcher", "torchrun", "SLURM srun" or "single process"

    def describe(self) -> str:
        return (f"rank {self.rank}/{self.world_size} (local {self.local_rank}) on {socket.gethostname()}, "
                f"master {self.master_addr}:{self.master_port}, from the {self.source}")


def slurm_master_port(job_id: int) -> int:
    """The job's rendezvous port: a pure function of the job id (launch/slurm/*.sbatch use the same formula)."""
    return SLURM_PORT_BASE + job_id % SLURM_PORT_SPAN


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list (`node[03-05,09],gpu1` -> `node03`)."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=20, check=True).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass  # no scontrol on this host: expand the list's first entry ourselves
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if match is None:
        raise LaunchError(f"cannot read the SLURM node list {nodelist!r}",
                          "set MASTER_ADDR to the first node's address")
    prefix, ranges = match.groups()
    return prefix + (ranges.split(",")[0].split("-")[0] if ranges else "")


def _int(environ: Mapping[str, str], name: str) -> int:
    raw = environ.get(name, "")
    if not raw.strip().isdigit():
        raise LaunchError(f"the environment variable {name}={raw!r} is not a non-negative whole number",
                          f"fix how the launcher sets {name}, or unset it")
    return int(raw)


def discover(environ: Mapping[str, str]) -> LaunchEnv:
    """This process's place in the job, from the launcher's or SLURM's variables."""
    if "RANK" in environ or "WORLD_SIZE" in environ:
        # AVA_LAUNCHER: set by export() when Ava wrote these variables itself (from SLURM's).
        source = environ.get("AVA_LAUNCHER") or ("torchrun" if "TORCHELASTIC_RUN_ID" in environ
                                                 else "deepspeed launcher")
        missing = [v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if v not in environ]
        if missing:
            raise LaunchError(f"the {source} environment is incomplete: {', '.join(missing)} not set",
                              "start train.py with `deepspeed`, `torchrun` or `srun`, which set all of them")
        return LaunchEnv(_int(environ, "RANK"), _int(environ, "WORLD_SIZE"),
                         _int(environ, "LOCAL_RANK") if "LOCAL_RANK" in environ else 0,
                         environ["MASTER_ADDR"], _int(environ, "MASTER_PORT"), source)
    if "SLURM_PROCID" in environ and "SLURM_STEP_ID" in environ:  # an srun step, not the batch script itself
        tasks = "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in environ else "SLURM_NTASKS"
        nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST", "")
        addr = environ.get("MASTER_ADDR") or first_host(nodelist)
        port = _int(environ, "MASTER_PORT") if "MASTER_PORT" in environ else \
            slurm_master_port(_int(environ, "SLURM_JOB_ID"))
        return LaunchEnv(_int(environ, "SLURM_PROCID"), _int(environ, tasks), _int(environ, "SLURM_LOCALID"),
                         addr, port, "SLURM srun")
    return LaunchEnv(0, 1, 0, "127.0.0.1", 0, "single process")


def export(env: LaunchEnv, environ: MutableMapping[str, str]) -> None:
    """Write `env` as the variables torch and DeepSpeed read (a single process gets a free local port)."""
    port = env.master_port or free_port()
    environ.update(RANK=str(env.rank), WORLD_SIZE=str(env.world_size), LOCAL_RANK=str(env.local_rank),
                   MASTER_ADDR=env.master_addr, MASTER_PORT=str(port), AVA_LAUNCHER=env.source)


def free_port() -> int:
    """A local TCP port free right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def timeout_seconds(environ: Mapping[str, str]) -> float:
    raw = environ.get(TIMEOUT_VAR, "")
    try:
        return float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        raise LaunchError(f"{TIMEOUT_VAR}={raw!r} is not a number of seconds",
                          f"set {TIMEOUT_VAR} to e.g. 120, or unset it for {DEFAULT_TIMEOUT_S:g}") from None


def rendezvous(env: LaunchEnv, timeout_s: float) -> Any:
    """Meet every rank on the master's TCP store, or raise LaunchError within about `timeout_s` seconds.

    Returns the store, for `torch.distributed.init_process_group(store=...)`.
    """
    from torch.distributed import PrefixStore, TCPStore

    where = f"{env.master_addr}:{env.master_port}"
    deadline = time.monotonic() + timeout_s
    if env.rank != 0:
        _reach(env, where, deadline, timeout_s)
    try:
        store = TCPStore(env.master_addr, env.master_port, env.world_size, is_master=env.rank == 0,
                         timeout=timedelta(seconds=timeout_s), wait_for_workers=False)
    except (RuntimeError, OSError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if env.rank == 0:
            raise LaunchError(
                f"rank 0 could not open the rendezvous at {where}: {reason}",
                "if the address is in use, another job holds the port: pick another MASTER_PORT (under SLURM "
                "the port comes from the job id); otherwise MASTER_ADDR must be an address of this host") from None
        raise LaunchError(
            f"rank {env.rank} could not reach the master at {where} within {timeout_s:g} s: {reason}",
            "check that MASTER_ADDR is the first node's address as seen from this node (not localhost on a "
            "multi-node job), that the port is open between nodes, and that rank 0 started; "
            f"raise {TIMEOUT_VAR} if nodes start far apart") from None
    check = PrefixStore("ava/preflight/", store)
    if check.add(f"rank{env.rank}", 1) > 1:
        raise LaunchError(f"two processes claim rank {env.rank} at {where}",
                          "every node needs a distinct node rank (--node_rank / SLURM_NODEID); "
                          "check the launch command of each node")
    check.set(f"world{env.rank}", str(env.world_size))
    check.add("arrived", 1)
    while _arrived(check, env, where) < env.world_size:
        if time.monotonic() > deadline:
            seen = [r for r in range(env.world_size) if check.check([f"world{r}"])]
            missing = sorted(set(range(env.world_size)) - set(seen))
            raise LaunchError(
                f"only {len(seen)} of {env.world_size} ranks reached the master at {where} within "
                f"{timeout_s:g} s (missing: ranks {_ranges(missing)})",
                "start all ranks with the same world size (SLURM: --ntasks = nodes x GPUs per node; deepspeed: "
                "the same --num_nodes/--num_gpus on every node) and a distinct node rank each; "
                f"raise {TIMEOUT_VAR} if nodes start far apart")
        time.sleep(0.05)
    worlds = {r: int(check.get(f"world{r}")) for r in range(env.world_size) if check.check([f"world{r}"])}
    disagree = {r: w for r, w in worlds.items() if w != env.world_size}
    if disagree:
        raise LaunchError(
            f"ranks disagree on the world size: rank {env.rank} has {env.world_size}, "
            + ", ".join(f"rank {r} has {w}" for r, w in sorted(disagree.items())),
            "launch every node with the same number of nodes and GPUs per node")
    return store


def _reach(env: LaunchEnv, where: str, deadline: float, timeout_s: float) -> None:
    """Wait for the master's port to accept a TCP connection: a plain socket fails cleanly, where
    torch's store client would print a C++ trace for every retry."""
    error: OSError | None = None
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((env.master_addr, env.master_port), timeout=min(5.0, timeout_s)):
                return
        except OSError as exc:  # refused (rank 0 not up yet), unreachable, unresolvable, timed out
            error = exc
            if isinstance(exc, socket.gaierror):
                break
            time.sleep(0.5)
    reason = f"{type(error).__name__}: {error}" if error else "timed out"
    raise LaunchError(
        f"rank {env.rank} could not reach the master at {where} within {timeout_s:g} s ({reason})",
        "check that MASTER_ADDR is the first node's address as seen from this node (not localhost on a "
        "multi-node job), that the port is open between nodes, and that rank 0 started; "
        f"raise {TIMEOUT_VAR} if nodes start far apart")


def _arrived(check: Any, env: LaunchEnv, where: str) -> int:
    try:
        return int(check.add("arrived", 0))
    except (RuntimeError, OSError):  # the store lives in rank 0: it stopped, most likely on its own error
        raise LaunchError(f"the master at {where} went away while rank {env.rank} waited for the other ranks",
                          "rank 0 stopped first: its error message says why") from None


def _ranges(values: list[int]) -> str:
    shown = ", ".join(map(str, values[:8]))
    return shown + (f", ... ({len(values) - 8} more)" if len(values) > 8 else "")


def launch_environment() -> LaunchEnv:
    """Discover and export this process's launch variables (before the config's world size is read)."""
    env = discover(os.environ)
    export(env, os.environ)
    return env
