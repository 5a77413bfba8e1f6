"""Worker for test_rlhf_zero3: sampling from a ZeRO-3 actor on 2 CPU ranks, gathered once vs per token.

Counts how often ZeRO-3's per-module fetch runs while generating (it gathers
a module's partitioned weights), generates through `generation_module` and,
for comparison, through the engine's hooks, then takes a training step to
show the hooks work again afterwards. Writes result_rank{N}.json.
"""

import json
import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator  # noqa: E402

from ava.config import ConfigFiles, WorldSize, load_config  # noqa: E402
from ava.model import AvaForCausalLM  # noqa: E402
from ava.rlhf.engines import build_engine, generation_module  # noqa: E402
from ava.train.runtime.distributed import init_distributed  # noqa: E402

FETCHES = {"count": 0}
_fetch = PartitionedParameterCoordinator.fetch_sub_module


def _counting_fetch(self, *args, **kwargs):
    FETCHES["count"] += 1
    return _fetch(self, *args, **kwargs)


PartitionedParameterCoordinator.fetch_sub_module = _counting_fetch


def _generate(model: AvaForCausalLM, prompt: torch.Tensor, tokens: int) -> tuple[list[list[int]], int]:
    before = FETCHES["count"]
    with torch.no_grad():
        out = model.generate(prompt, tokens, temperature=0.0)
    return out.tolist(), FETCHES["count"] - before


def main() -> None:
    repo = sys.argv[-1]
    files = ConfigFiles(f"{repo}/configs/gpu/tiny.yaml", f"{repo}/configs/hardware/cpu.yaml",
                        f"{repo}/configs/distributed/deepspeed_zero3.yaml")
    overrides = ("--hidden_size", "64", "--num_layers", "2", "--intermediate_size", "64", "--vocab_size", "257",
                 "--max_position_embeddings", "64", "--max_length", "64", "--cpu_offload", "false",
                 "--deepspeed.stage3_param_persistence_threshold", "0", "--batch_size", "2",
                 "--deepspeed.train_batch_size", "4")
    cfg = load_config(files, overrides, WorldSize(2, "test")).config
    process = init_distributed()
    torch.manual_seed(0)
    model = AvaForCausalLM(cfg.model)  # MoE: 4 experts, top-2, as tiny.yaml
    whole = AvaForCausalLM(cfg.model)
    whole.load_state_dict(model.state_dict())
    actor = build_engine(model, cfg, "actor", 3, micro_batch=2, world_size=2, learning_rate=1e-3)
    prompt = torch.tensor([[5, 17, 42, 9], [3, 3, 200, 1]])
    result: dict = {"rank": process.rank}
    for tokens in (2, 8):
        with generation_module(actor) as module:
            result[f"gathered_{tokens}"], result[f"gathered_fetches_{tokens}"] = _generate(module, prompt, tokens)
        result[f"hooked_{tokens}"], result[f"hooked_fetches_{tokens}"] = _generate(actor.module, prompt, tokens)
    result["whole"] = _generate(whole, prompt, 8)[0]
    ids = torch.randint(0, 257, (2, 12), generator=torch.Generator().manual_seed(process.rank))
    out = actor.engine(ids, labels=ids)
    actor.engine.backward(out.loss)
    actor.engine.step()
    result["loss_after"] = float(out.loss)
    with open(f"result_rank{process.rank}.json", "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
    from ava.train.runtime.distributed import exit_launched_worker

    exit_launched_worker()
