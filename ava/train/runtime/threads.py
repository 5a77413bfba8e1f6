"""Each rank's intra-op threads: its share of the cores, not what the shell asked for.

PyTorch sizes its intra-op pool from `OMP_NUM_THREADS`, or from the cores it
sees. Every rank on a node does the same, so `deepspeed --num_gpus 2` on two
cores with `OMP_NUM_THREADS=2` (a common shell setting) runs four compute
threads on two cores; OpenMP threads spin while they wait for each other, and
a step becomes many times slower. torchrun avoids this by exporting
`OMP_NUM_THREADS=1` when it starts several processes and none is set; Ava goes
one step further and lowers any request above the rank's share, where the
share is the cores this rank may run on divided by the ranks that run on them.

Which cores the ranks share is read without talking to the other ranks:
- the cores this process may run on: its CPU affinity (a cpuset, `numactl`
  or `taskset` narrows it);
- the ranks on this node: the launcher's count (`LOCAL_SIZE` from the
  `deepspeed` launcher, `LOCAL_WORLD_SIZE` from torchrun, SLURM's tasks per
  node), 1 without a launcher;
- whether the launcher bound each rank to its own cores
  (`deepspeed --bind_cores_to_rank`, `srun --cpu-bind`): then the ranks'
  affinities together fit in the node's cores, and a rank's share is all of
  its own affinity.

`AVA_THREADS` overrides the rule: `keep` leaves PyTorch's count alone, a
number sets it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path

from ava.errors import UserError

THREADS_VAR = "AVA_THREADS"
# The container's cpuset (cgroup v2, then v1): os.cpu_count() is the host's count inside a container.
CPUSET_FILES = ("/sys/fs/cgroup/cpuset.cpus.effective", "/sys/fs/cgroup/cpuset/cpuset.effective_cpus")


@dataclass(frozen=True)
class ThreadPlan:
    """How many intra-op threads this rank runs, and why (`note` is None when nothing changes)."""

    threads: int
    requested: int
    note: str | None


def local_ranks(environ: Mapping[str, str]) -> int:
    """How many ranks the launcher started on this node (1 without a launcher)."""
    for name in ("LOCAL_SIZE", "LOCAL_WORLD_SIZE"):  # the deepspeed launcher, torchrun
        if environ.get(name, "").isdigit() and int(environ[name]) > 0:
            return int(environ[name])
    # SLURM: "2" or "2(x3),1": the count for each node, in node order; this node is SLURM_NODEID.
    per_node = environ.get("SLURM_STEP_TASKS_PER_NODE") or environ.get("SLURM_TASKS_PER_NODE")
    if per_node and "SLURM_PROCID" in environ:
        counts: list[int] = []
        for part in per_node.split(","):
            match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
            if match is None:
                return 1
            counts += [int(match.group(1))] * int(match.group(2) or 1)
        node = int(environ["SLURM_NODEID"]) if environ.get("SLURM_NODEID", "").isdigit() else 0
        return counts[node] if node < len(counts) else 1
    return 1


def _cpuset_size(text: str) -> int:
    """The number of CPUs in a cpuset list such as `0-3,8,10-11`."""
    total = 0
    for part in text.strip().split(","):
        if part:
            low, _, high = part.partition("-")
            total += int(high or low) - int(low) + 1
    return total


def node_cores() -> int:
    """The cores every process here may use: the container's cpuset where readable, else the online CPUs."""
    for path in CPUSET_FILES:
        try:
            size = _cpuset_size(Path(path).read_text())
        except (OSError, ValueError):
            continue
        if size > 0:
            return size
    return os.cpu_count() or 1


def share(own_cores: int, node: int, ranks: int) -> int:
    """A rank's share of the cores: all of its own when the launcher bound each rank to its own cores
    (the ranks' affinities then fit in the node side by side), else its affinity split between the ranks."""
    if ranks > 1 and own_cores < node and own_cores * ranks <= node:
        return own_cores
    return max(1, own_cores // ranks)


def plan_threads(requested: int, own_cores: int, node: int, ranks: int, setting: str | None,
                 asked_by: str = "PyTorch's default (all cores)") -> ThreadPlan:
    """The intra-op thread count for a rank that PyTorch would give `requested` threads (`asked_by` says
    where that number came from; `setting` is `AVA_THREADS`)."""
    setting = (setting or "").strip().lower()
    if setting == "keep":
        return ThreadPlan(requested, requested, None)
    if setting not in ("", "auto"):
        if not setting.isdigit() or not 1 <= int(setting) <= 4096:
            raise UserError(f"the environment variable {THREADS_VAR}={setting!r} is not 'auto', 'keep' or a "
                            "number of threads from 1 to 4096",
                            f"unset {THREADS_VAR} (each rank takes its share of the cores), or set it to keep "
                            "or to the threads per rank")
        n = int(setting)
        return ThreadPlan(n, requested, None if n == requested else f"{THREADS_VAR}={n}: {n} intra-op threads "
                          "per rank")
    fair = share(own_cores, node, ranks)
    if requested <= fair:
        return ThreadPlan(requested, requested, None)
    who = f"{ranks} ranks on this node share" if ranks > 1 else "this process has"
    return ThreadPlan(fair, requested, (
        f"each rank runs {fair} intra-op thread(s), its share of the cores ({who} {own_cores}), not the "
        f"{requested} that {asked_by} asks for: threads beyond the cores spin while they wait for each other "
        f"and slow every step. Set {THREADS_VAR}=keep to keep {requested}, or {THREADS_VAR}=N for N per rank"))


def set_rank_threads(environ: MutableMapping[str, str], *, print_note: bool) -> ThreadPlan:
    """Give this rank its share of the cores (see the module docstring); say so once, where `print_note`."""
    import torch

    omp = environ.get("OMP_NUM_THREADS")
    plan = plan_threads(torch.get_num_threads(), len(os.sched_getaffinity(0)), node_cores(), local_ranks(environ),
                        environ.get(THREADS_VAR), f"OMP_NUM_THREADS={omp}" if omp else "PyTorch's default (all cores)")
    if plan.threads != plan.requested:
        torch.set_num_threads(plan.threads)
        environ["OMP_NUM_THREADS"] = str(plan.threads)  # what this rank's own subprocesses inherit
    if plan.note and print_note:
        print(f"note: {plan.note}", flush=True)
    return plan
