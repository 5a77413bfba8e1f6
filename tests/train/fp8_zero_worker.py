"""Worker for test_fp8_zero: several training runs, one after another, in one 2-rank DeepSpeed launch.

Each run is `ava.train.pretraining.train()` on a config stack resolved exactly as
train.py resolves it (base + hardware + distributed config + overrides); one
launch for all runs saves the launcher's and the imports' start-up per run.
The job file (last argument) lists the runs; rank 0 writes each run's
per-step losses and precision report to `results.json` beside it.
"""

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

from ava.config import ConfigFiles, WorldSize, build_deepspeed_config, load_config  # noqa: E402
from ava.data.setup import build_training_data  # noqa: E402
from ava.train.callbacks.records import Records  # noqa: E402
from ava.train.pretraining import train  # noqa: E402
from ava.train.runtime.distributed import init_distributed  # noqa: E402


def run(job: dict, spec: dict, process) -> dict:
    files = ConfigFiles(job["config"], job["hardware_config"], spec["distributed_config"])
    resolved = load_config(files, [*job["overrides"], *spec["overrides"]],
                           WorldSize(process.world_size, "fp8_zero_worker"))
    cfg, batch = resolved.config, resolved.batch
    steps = cfg.training.max_steps
    data = build_training_data(cfg.data, cfg.model.vocab_size, batch.micro, cfg.data.eval_batch_size, process.rank,
                               process.world_size, needed_sequences=steps * batch.global_batch, max_steps=steps)
    records: list[dict] = []
    result = train(cfg, build_deepspeed_config(cfg), process, data.train, None, callbacks=[Records(records.append)])
    return {"name": spec["name"], "zero_stage": cfg.deepspeed.zero_stage, "status": result.status,
            "losses": [r["loss"] for r in records if "loss" in r],
            "precision": result.precision.as_dict() if result.precision is not None else None}


def main() -> None:
    job_path = Path(sys.argv[-1])
    job = json.loads(job_path.read_text())
    process = init_distributed()
    results = [run(job, spec, process) for spec in job["runs"]]
    if process.rank == 0:  # a file, not stdout: the launcher interleaves the ranks' output
        (job_path.parent / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
    # As train.py does: release DeepSpeed's /dev/shm buffer and skip the teardown that can abort (-6) at exit.
    from ava.train.runtime.distributed import exit_launched_worker

    exit_launched_worker()
