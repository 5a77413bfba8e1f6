"""The worker `ava doctor` launches on N ranks: two ZeRO-3 training steps of a tiny MoE model, then a report.

Run by the deepspeed launcher (`deepspeed --num_gpus N ava/doctor/zero3_probe.py RESULT_DIR`), it goes
through the same process-group start as train.py (`ava.train.runtime.distributed.init_distributed`, with its
rendezvous deadline), so a cluster that can run it can start a real job: NCCL/gloo connect, ZeRO-3
partitions and gathers parameters, gradients are reduce-scattered and the optimizer steps. Each rank
writes `RESULT_DIR/rank{N}.json`; the ranks' losses must agree, as ZeRO-3 averages one global batch.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def main(result_dir: Path) -> None:
    started = time.perf_counter()
    import deepspeed
    import torch
    from deepspeed.accelerator import get_accelerator

    from ava.config.schema.model import ModelConfig
    from ava.model import AvaForCausalLM
    from ava.model.zero3 import mark_moe_zero3_leaves
    from ava.train.runtime.distributed import exit_launched_worker, init_distributed
    from ava.train.runtime.op_build import guard_lock_waits

    guard_lock_waits()  # a stale op-build lock fails the check with its `rm` fix instead of hanging it
    process = init_distributed()
    device = torch.device(get_accelerator().device_name(process.local_rank))
    torch.manual_seed(0)
    config = ModelConfig(hidden_size=64, num_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=128,
                         max_position_embeddings=32, num_experts=4, num_experts_per_token=2)
    model = AvaForCausalLM(config)
    mark_moe_zero3_leaves(model)
    ds_config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
                 "train_batch_size": 2 * process.world_size,
                 "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
                 "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
                 "gradient_clipping": 1.0}
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
    losses = []
    generator = torch.Generator().manual_seed(process.rank)
    for _ in range(2):
        batch = torch.randint(0, config.vocab_size, (2, 16), generator=generator).to(device)
        loss = engine(batch, labels=batch).loss
        engine.backward(loss)
        engine.step()
        mean = loss.detach().float().clone()
        torch.distributed.all_reduce(mean)
        losses.append(float(mean) / process.world_size)
    report = {"rank": process.rank, "world_size": process.world_size, "device": str(device),
              "backend": torch.distributed.get_backend(), "losses": losses, "seconds": time.perf_counter() - started}
    (result_dir / f"rank{process.rank}.json").write_text(json.dumps(report))
    exit_launched_worker(0)


if __name__ == "__main__":
    main(Path([a for a in sys.argv[1:] if not a.startswith("--local_rank")][0]))
