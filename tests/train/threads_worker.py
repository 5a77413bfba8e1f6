"""Worker for test_rank_threads: a rank that joins the process group as train.py's ranks do, then says how many
intra-op threads it runs (one JSON line: {"rank": R, "threads": N, "omp": "..."})."""

import json
import os

import torch
import torch.distributed as dist

from ava.train.runtime.distributed import exit_launched_worker, init_distributed

process = init_distributed()
print(json.dumps({"rank": process.rank, "threads": torch.get_num_threads(),
                  "omp": os.environ.get("OMP_NUM_THREADS")}), flush=True)
# Each rank maps the others' shared-memory buffers while the group starts: one that left at once would unlink
# its buffer before the other had mapped it (a real run always meets in a collective first).
dist.barrier()
exit_launched_worker()
