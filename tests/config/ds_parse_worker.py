"""Run DeepSpeed's own config parser on generated configs (a subprocess of the tests).

DeepSpeedConfig takes the data-parallel size from an initialised process
group, so this worker starts a one-process gloo group and passes an `mpu`
that reports the world size each config was generated for.  Reads a JSON list
of {"label", "world", "config"} on stdin; prints one JSON line per case.
"""

import json
import os
import socket
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DataParallelOnly:
    """The slice of Megatron's mpu interface that DeepSpeedConfig reads."""

    def __init__(self, world: int):
        self.world = world

    def get_data_parallel_world_size(self) -> int:
        return self.world

    def get_data_parallel_rank(self) -> int:
        return 0

    def get_model_parallel_world_size(self) -> int:
        return 1

    def get_model_parallel_rank(self) -> int:
        return 0


def main() -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", LOCAL_RANK="0",
                      WORLD_SIZE="1")
    import deepspeed.comm as dist
    from deepspeed.runtime.config import DeepSpeedConfig

    dist.init_distributed(dist_backend="gloo", verbose=False)
    for case in json.load(sys.stdin):
        try:
            parsed = DeepSpeedConfig(case["config"], mpu=DataParallelOnly(case["world"]))
            out = {
                "label": case["label"], "ok": True,
                "train_batch_size": parsed.train_batch_size,
                "micro": parsed.train_micro_batch_size_per_gpu,
                "accumulation": parsed.gradient_accumulation_steps,
                "stage": parsed.zero_optimization_stage,
                "bf16": parsed.bfloat16_config.enabled,
                "fp16": parsed.float16_config.enabled,
                "clip": parsed.gradient_clipping,
                "offload_optimizer": str(parsed.zero_config.offload_optimizer.device)
                if parsed.zero_config.offload_optimizer else None,
            }
        except Exception as exc:  # report, do not stop: every case is checked
            out = {"label": case["label"], "ok": False, "error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
