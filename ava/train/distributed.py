"""Process-group setup for DeepSpeed, with or without a launcher.

`deepspeed train.py` and torchrun export RANK/WORLD_SIZE/MASTER_*; a plain
`python train.py` exports nothing, so a one-process group on localhost is
described here first. gloo on CPU (DS_ACCELERATOR=cpu), nccl on GPUs.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass


@dataclass(frozen=True)
class ProcessInfo:
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def init_distributed() -> ProcessInfo:
    """Initialise torch.distributed through DeepSpeed (once) and describe this process."""
    import deepspeed
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    if "RANK" not in os.environ:  # no launcher: a group of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    if not dist.is_initialized():
        backend = "gloo" if get_accelerator().device_name() == "cpu" else get_accelerator().communication_backend_name()
        deepspeed.init_distributed(dist_backend=backend, verbose=False)
    return ProcessInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
