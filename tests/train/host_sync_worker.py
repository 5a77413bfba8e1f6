"""Worker for test_no_host_sync: one `train()` run that records every read of a tensor's value made by Ava's code.

A read (`.item()`, `.tolist()`, `float()`, `bool()`, `.cpu()`, ...) waits for
the device to finish everything queued: on a GPU, one per step keeps the host
from running ahead. Tensor methods are wrapped so each call from a frame in
`ava/` is recorded with its step (the step whose batch was taken last) and
source line and function; reads inside torch or DeepSpeed are theirs, not
counted. Prints one JSON object: {"steps": N, "reads": [[step, "file:line
function method"], ...]}.
"""

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
    os.environ.pop(var, None)

import torch  # noqa: E402

from ava.config import ConfigFiles, WorldSize, build_deepspeed_config, load_config  # noqa: E402
from ava.data.setup import build_training_data  # noqa: E402
from ava.train.pretraining import train  # noqa: E402
from ava.train.runtime.distributed import init_distributed  # noqa: E402
from ava.train.runtime.preemption import PreemptionFlag  # noqa: E402

AVA = str(Path(__file__).resolve().parents[2] / "ava")
READS = ("item", "tolist", "__float__", "__int__", "__bool__", "cpu", "numpy")


class CountedBatches:
    """The training batches, counting how many were taken: the step in progress."""

    def __init__(self, batches):
        self.batches, self.taken = batches, 0

    def __iter__(self):
        for batch in self.batches:
            self.taken += 1
            yield batch

    def __getattr__(self, name):
        return getattr(self.batches, name)


def main() -> None:
    steps, overrides = int(sys.argv[1]), sys.argv[2:]
    files = ConfigFiles("configs/gpu/tiny.yaml", "configs/hardware/cpu.yaml", None)
    cfg = load_config(files, ["--max_steps", str(steps), *overrides], WorldSize(1, "host_sync_worker")).config
    process = init_distributed()
    data = build_training_data(cfg.data, cfg.model.vocab_size, cfg.training.batch_size, cfg.data.eval_batch_size,
                               process.rank, process.world_size, needed_sequences=steps * cfg.training.batch_size,
                               max_steps=steps)
    batches = CountedBatches(data.train)
    reads: list[tuple[int, str]] = []

    def recording(name, original):
        def wrapper(self, *args, **kwargs):
            caller = sys._getframe(1)
            if caller.f_code.co_filename.startswith(AVA):
                where = f"{Path(caller.f_code.co_filename).name}:{caller.f_lineno} {caller.f_code.co_name}"
                reads.append((batches.taken, f"{where} {name}"))
            return original(self, *args, **kwargs)
        return wrapper

    for name in READS:
        setattr(torch.Tensor, name, recording(name, getattr(torch.Tensor, name)))
    with PreemptionFlag() as preemption:
        result = train(cfg, build_deepspeed_config(cfg), process, batches, None,
                       preemption=preemption)
    print(json.dumps({"steps": result.steps, "reads": reads}))


if __name__ == "__main__":
    main()
