"""Worker for test_zero3_moe: trains an MoE model under ZeRO-3 on 2 CPU ranks with different data.

Each rank routes its own tokens, so ranks use different experts. Prints one
JSON file per rank (result_rank{N}.json in the working directory): losses, leaf count, and a checksum of the gathered weights.
"""

import json
import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed  # noqa: E402
import torch  # noqa: E402

from ava.config.schema.model import ModelConfig  # noqa: E402
from ava.model import AvaForCausalLM  # noqa: E402
from ava.model.zero3 import mark_moe_zero3_leaves  # noqa: E402


def main() -> None:
    # The launcher puts --local_rank=N before our own argument, so the mode is looked for anywhere in argv.
    deepspeed.init_distributed(dist_backend="gloo")
    rank = torch.distributed.get_rank()
    torch.manual_seed(0)
    cfg = ModelConfig(hidden_size=32, num_layers=2, num_attention_heads=4, intermediate_size=32, vocab_size=64,
                      max_position_embeddings=32, num_experts=8, num_experts_per_token=1, router_type="switch",
                      expert_capacity_factor=1.0 if "capacity" in sys.argv[1:] else None)
    model = AvaForCausalLM(cfg)
    initial = float(sum(p.double().sum() for p in model.parameters()))
    leaves = mark_moe_zero3_leaves(model)
    ds_config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "train_batch_size": 2,
                 "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
                 "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
                 "gradient_clipping": 1.0}
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
    gen = torch.Generator().manual_seed(100 + rank)  # different tokens, hence different experts, per rank
    losses, used = [], []
    for _ in range(4):
        ids = torch.randint(0, 64, (1, 6), generator=gen)  # 6 tokens over 8 experts: some idle per rank
        out = engine(ids, labels=ids)
        engine.backward(out.loss)
        engine.step()
        losses.append(float(out.loss))
        used.append([int(v) for v in out.moe_stats[0].load.tolist()])
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        checksum = float(sum(p.double().sum() for p in engine.module.parameters()))
    result = {"rank": rank, "leaves": leaves, "losses": losses, "load": used, "checksum": checksum, "initial": initial}
    with open(f"result_rank{rank}.json", "w") as f:  # files, not stdout: the launcher interleaves rank output
        json.dump(result, f)


if __name__ == "__main__":
    main()
    # As train.py does: release DeepSpeed's /dev/shm buffer and skip the teardown that can abort (-6) at exit.
    from ava.train.runtime.distributed import exit_launched_worker

    exit_launched_worker()
