"""Worker for test_expert_parallel, run on 2 CPU ranks by the `deepspeed` launcher.

`layers`: plain torch.distributed. Every rank builds the whole MoE layer,
keeps a copy as the reference, spreads the experts over the 2 ranks and
compares outputs and gradients with the reference run on each rank's tokens.

`engine`: DeepSpeed ZeRO 1 and 2, ep_size 2. Trains a tiny MoE model a few
steps on each rank's batches, then saves a checkpoint, loads it back into the
same engine and into a fresh one.

Each rank writes its results to files in the working directory (the launcher
interleaves the ranks' stdout): result_{mode}_rank{N}.json and, for `engine`,
the trained weights as state_{case}_rank{N}.pt.
"""

from __future__ import annotations

import copy
import json
import os
import sys

import torch

from ava.config.schema.model import ModelConfig
from ava.model.moe.expert_parallel import ExpertParallel

STEPS = 3
WEIGHT_DECAY = 0.1
CLIP = 0.3  # below the gradient norm, so clipping (and hence the global norm over all experts) matters
# SGD updates are proportional to the gradients, so the trained weights check every gradient's
# reduction and scale; Adam divides the scale away. AdamW, Ava's optimizer, is run once as well.
OPTIMIZERS = {"SGD": {"lr": 0.5}, "AdamW": {"lr": 1e-2, "betas": [0.9, 0.95], "eps": 1e-8}}
CASES = {"zero1_dropless": (1, None, "SGD"), "zero2_dropless": (2, None, "SGD"),
         "zero1_capacity": (1, 1.0, "SGD"), "zero2_capacity": (2, 1.0, "SGD"), "zero2_adamw": (2, None, "AdamW")}


def model_config(capacity: float | None) -> ModelConfig:
    return ModelConfig(hidden_size=32, num_layers=2, num_attention_heads=4, intermediate_size=32, vocab_size=64,
                       max_position_embeddings=32, num_experts=4, num_experts_per_token=2, router_type="topk",
                       expert_capacity_factor=capacity)


def batch(step: int, rank: int) -> torch.Tensor:
    """Rank `rank`'s micro-batch at `step`: the global batch is both ranks' batches."""
    gen = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randint(0, 64, (2, 12), generator=gen)


def _error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to the largest |b| (absolute where b is below 1): fp32 sums of hundreds of terms."""
    return float((a - b).abs().max() / b.abs().max().clamp_min(1.0)) if a.numel() else 0.0


# ---- layers: the all-to-all layer against the whole layer, no DeepSpeed ----

LAYER_CASES = {
    "dropless": dict(router="topk", capacity=None, shared=0),
    "capacity": dict(router="topk", capacity=1.0, shared=16),
    # Every token picks experts 0 and 1, both on rank 0: rank 1 receives no rows at all.
    "skewed": dict(router="aux_loss_free", capacity=None, shared=0),
}


def _tokens(source: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Source rank's input and output cotangent; the ranks hold different numbers of tokens."""
    gen = torch.Generator().manual_seed(100 + source)
    shape = (2, 5, 32) if source == 0 else (1, 7, 32)
    return torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)


def _layer_case(name: str, ep: ExpertParallel, world: int, rank: int) -> dict:
    from ava.model.moe import MoELayer

    spec = LAYER_CASES[name]
    torch.manual_seed(0)
    layer = MoELayer(32, 48, 4, 2, spec["router"], "swiglu", spec["capacity"], 0.01, 0.001,
                     shared_intermediate_size=spec["shared"])
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.3)
        if name == "skewed":
            layer.router.expert_bias.copy_(torch.tensor([10.0, 10.0, -10.0, -10.0]))
    reference = copy.deepcopy(layer)
    layer.distribute_experts(ep)
    start, stop = ep.owned(4)

    x, g = _tokens(rank)
    x.requires_grad_(True)
    out, stats = layer(x)
    ((out * g).sum() + stats.router_loss).backward()

    expert_grads = {n: torch.zeros_like(p) for n, p in reference.experts.named_parameters()}
    ref = {}
    for source in range(world):
        xs, gs = _tokens(source)
        xs.requires_grad_(True)
        reference.zero_grad()
        out_s, stats_s = reference(xs)
        ((out_s * gs).sum() + stats_s.router_loss).backward()
        for n, p in reference.experts.named_parameters():
            expert_grads[n] += p.grad  # the expert-parallel experts are trained by every rank's tokens
        if source == rank:
            ref = {"out": out_s.detach(), "x_grad": xs.grad, "router_loss": stats_s.router_loss.detach(),
                   "load": stats_s.load, "router_grad": reference.router.gate.weight.grad.clone()}
    return {
        "out": _error(out.detach(), ref["out"]),
        "x_grad": _error(x.grad, ref["x_grad"]),
        "router_grad": _error(layer.router.gate.weight.grad, ref["router_grad"]),
        "router_loss": _error(stats.router_loss.detach(), ref["router_loss"]),
        "same_load": bool(torch.equal(stats.load, ref["load"])),
        "expert_grads": {n: _error(p.grad, expert_grads[n][start:stop]) for n, p in layer.experts.named_parameters()},
        "local_expert_shape": list(layer.experts.up_proj.shape),
        "local_expert_grad_norm": float(sum(p.grad.norm() for p in layer.experts.parameters())),
    }


def _model_case(ep: ExpertParallel, world: int, rank: int) -> dict:
    """The whole model, with gradient checkpointing: backward recomputes the layers, all-to-alls included."""
    from ava.model import AvaForCausalLM

    torch.manual_seed(0)
    model = AvaForCausalLM(model_config(1.0), gradient_checkpointing=True)
    reference = copy.deepcopy(model)
    reference.gradient_checkpointing = False
    for layer in model.moe_layers():
        layer.distribute_experts(ep)
    start, stop = ep.owned(4)
    ids = batch(0, rank)
    out = model(ids, labels=ids)
    out.loss.backward()
    errors = {}
    for source in range(world):
        reference.zero_grad()
        src = batch(0, source)
        ref = reference(src, labels=src)
        ref.loss.backward()
        for name, _ in model.named_parameters():
            want = reference.get_parameter(name).grad
            if ".experts." in name:  # trained by both ranks' tokens
                errors[name] = errors.get(name, 0) + want[start:stop]
            elif source == rank:
                errors[name] = want
        if source == rank:
            errors["logits"], errors["loss"] = ref.logits.detach(), ref.loss.detach()
    got = {**{n: p.grad for n, p in model.named_parameters()}, "logits": out.logits.detach(), "loss": out.loss.detach()}
    return {name: _error(got[name], want) for name, want in errors.items()}


def run_layers() -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    ep = ExpertParallel(dist.new_group(list(range(world))), rank, world)
    result: dict = {"rank": rank, "cases": {name: _layer_case(name, ep, world, rank) for name in LAYER_CASES}}

    result["model"] = _model_case(ep, world, rank)
    with open(f"result_layers_rank{rank}.json", "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


# ---- engine: DeepSpeed ZeRO 1/2 with ep_size 2 ----

def ds_config(stage: int, optimizer: str) -> dict:
    params = {**OPTIMIZERS[optimizer], "weight_decay": WEIGHT_DECAY, **({"torch_adam": True} if optimizer == "AdamW" else {})}
    return {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "train_batch_size": 4,
            "zero_optimization": {"stage": stage, "overlap_comm": True, "contiguous_gradients": True},
            "optimizer": {"type": optimizer, "params": params},
            "gradient_clipping": CLIP, "steps_per_print": 1000000,
            "zero_allow_untested_optimizer": optimizer == "SGD"}  # SGD is plain torch: nothing ZeRO-specific


def _engine(stage: int, capacity: float | None, optimizer: str, seed: int):
    import deepspeed

    from ava.model import AvaForCausalLM
    from ava.train.engine.expert_parallel import expert_parallel_engine, prepare_expert_parallel

    torch.manual_seed(seed)
    model = AvaForCausalLM(model_config(capacity))
    model_parameters = prepare_expert_parallel(model, 2)
    with expert_parallel_engine(model):
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model_parameters,
                                               config=ds_config(stage, optimizer))
    return engine


def _step(engine, step: int, rank: int) -> tuple[float, float]:
    """One optimizer step; returns the global batch's loss and DeepSpeed's global gradient norm."""
    import torch.distributed as dist

    ids = batch(step, rank)
    out = engine(ids, labels=ids)
    engine.backward(out.loss)
    engine.step()
    loss = out.loss.detach().clone()
    dist.all_reduce(loss)
    return float(loss) / dist.get_world_size(), float(engine.get_global_grad_norm())


def _weights(engine) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in engine.module.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _engine_case(name: str, rank: int) -> dict:
    import torch.distributed as dist

    stage, capacity, optimizer = CASES[name]
    engine = _engine(stage, capacity, optimizer, seed=0)
    losses, norms = zip(*(_step(engine, step, rank) for step in range(STEPS)), strict=True)
    trained = _weights(engine)
    torch.save(trained, f"state_{name}_rank{rank}.pt")

    # Checkpoint round trip: save, take one more step, load, take the same step again.
    ckpt = os.path.abspath(f"ckpt_{name}")
    engine.save_checkpoint(ckpt, tag="saved")
    next_loss, _ = _step(engine, STEPS, rank)
    after_step = _weights(engine)
    engine.load_checkpoint(ckpt, tag="saved")
    restored = _same(_weights(engine), trained)
    replayed_loss, _ = _step(engine, STEPS, rank)
    replayed = _same(_weights(engine), after_step)

    # A fresh engine from different initial weights, loading the module only: the weights come from the files.
    fresh = _engine(stage, capacity, optimizer, seed=1)
    differs_before = not _same(_weights(fresh), trained)
    fresh.load_checkpoint(ckpt, tag="saved", load_module_only=True, load_optimizer_states=False,
                          load_lr_scheduler_states=False)
    module_only = _same(_weights(fresh), trained)
    dist.barrier()
    return {"losses": losses, "grad_norms": norms, "has_moe_layers": bool(engine.has_moe_layers),
            "moe_param_groups": sum(bool(g.get("moe")) for g in engine.optimizer.optimizer.param_groups),
            "restored": restored, "next_loss": next_loss, "replayed_loss": replayed_loss, "replayed": replayed,
            "fresh_differs_before": differs_before, "module_only": module_only,
            "files": sorted(os.listdir(os.path.join(ckpt, "saved")))}


def run_engine() -> None:
    import deepspeed
    import torch.distributed as dist

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    rank = dist.get_rank()
    result = {"rank": rank, "cases": {name: _engine_case(name, rank) for name in CASES}}
    with open(f"result_engine_rank{rank}.json", "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    mode = [a for a in sys.argv[1:] if not a.startswith("--local_rank")][0]  # the launcher adds --local_rank=N
    {"layers": run_layers, "engine": run_engine}[mode]()
    # As train.py does: release DeepSpeed's /dev/shm buffer and skip the teardown that can abort (-6) at exit.
    from ava.train.runtime.distributed import exit_launched_worker

    exit_launched_worker()
