"""Process-group setup for DeepSpeed, with or without a launcher.

`deepspeed train.py` and torchrun export RANK/WORLD_SIZE/MASTER_*, `srun`
exports SLURM's variables (`ava.train.runtime.rendezvous` turns them into the same),
and a plain `python train.py` exports nothing: a one-process group on
localhost. Several ranks first meet in a rendezvous with a deadline, so a
wrong master or world size fails in seconds. gloo on CPU
(DS_ACCELERATOR=cpu), nccl on GPUs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class ProcessInfo:
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> ProcessInfo:
    """Initialise torch.distributed through DeepSpeed (once) and describe this process."""
    import deepspeed
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    from ava.train.runtime.rendezvous import discover, export, rendezvous, timeout_seconds

    env = discover(os.environ)
    if "RANK" not in os.environ:  # no launcher: a group of one
        export(env, os.environ)
    if not dist.is_initialized():
        backend = "gloo" if get_accelerator().device_name() == "cpu" else get_accelerator().communication_backend_name()
        if env.world_size > 1:
            store = rendezvous(env, timeout_seconds(os.environ))
            dist.init_process_group(backend, store=store, rank=env.rank, world_size=env.world_size)
        deepspeed.init_distributed(dist_backend=backend, verbose=False)
    return ProcessInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


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
