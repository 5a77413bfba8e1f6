"""MoE layer forward+backward time against its floor and its peers, in one run.

    python benchmarks/moe_layer.py [--tokens 4096] [--repeats 7] [--dtypes fp32,bf16] [--json out.json]

Rows (8 experts, top-2, hidden 512, expert width 1024, 4096 tokens):
  ava dropless          Ava's MoELayer, no token dropped
  ava capacity 1.25     Ava's MoELayer dropping over-capacity tokens
  dense equal-active    Ava's dense SwiGLU FFN of width 2048 = k x expert width: the floor
  dense (again)         the same dense FFN timed as a second row: the spread between the two
                        is the measurement noise of this machine
  deepspeed MoE         deepspeed.moe.layer.MoE, capacity factor 1.25
  hf mixtral block      transformers' MixtralSparseMoeBlock (a loop over experts)
Ratios use the faster of the two dense rows. Targets (fp32): ava <= 1.0x dense, and
deepspeed / ava >= 1.2.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from ava.model.mlp import DenseMLP  # noqa: E402
from ava.model.moe import MoELayer  # noqa: E402
from benchmarks.timing import interleaved, print_table, write_json  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _ava(h: int, i: int, e: int, k: int, capacity: float | None) -> nn.Module:
    return MoELayer(h, i, e, k, "topk", "swiglu", capacity, 0.01, 0.001)


def _deepspeed(h: int, i: int, e: int, k: int) -> nn.Module | None:
    try:
        import deepspeed
        from deepspeed.moe.layer import MoE
    except ImportError:
        return None
    if not torch.distributed.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    return MoE(hidden_size=h, expert=DenseMLP(h, i, "swiglu", False), num_experts=e, ep_size=1, k=k,
               capacity_factor=1.25, eval_capacity_factor=1.25, min_capacity=4, drop_tokens=True)


def _hf_mixtral(h: int, i: int, e: int, k: int) -> nn.Module | None:
    try:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    except ImportError:
        return None
    block = MixtralSparseMoeBlock(MixtralConfig(hidden_size=h, intermediate_size=i, num_local_experts=e,
                                                num_experts_per_tok=k))
    for p in block.parameters():  # transformers leaves some weights uninitialised until a full model inits
        nn.init.normal_(p, std=0.02)
    return block


def _step(module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        out = module(x)
        if isinstance(out, tuple):
            extra = [o for o in out[1:] if isinstance(o, torch.Tensor) and o.requires_grad]
            out = out[0]
        else:
            extra = []
        loss = (out * grad).sum() + sum(e.sum() for e in extra)
        loss.backward()
        module.zero_grad(set_to_none=True)
        x.grad = None
    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--expert_width", type=int, default=1024)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top_k", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--json", default=None, help="write results to this JSON file")
    ns = parser.parse_args(argv)
    h, i, e, k, t = ns.hidden, ns.expert_width, ns.experts, ns.top_k, ns.tokens
    print(f"MoE layer fwd+bwd: {e} experts, top-{k}, hidden {h}, expert width {i}, {t} tokens, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    results = []
    for dname in ns.dtypes.split(","):
        dtype = DTYPES[dname]
        torch.manual_seed(0)
        modules = {"ava dropless": _ava(h, i, e, k, None), "ava capacity 1.25": _ava(h, i, e, k, 1.25),
                   "dense equal-active": DenseMLP(h, k * i, "swiglu", False),
                   "dense (again)": DenseMLP(h, k * i, "swiglu", False),
                   "deepspeed MoE": _deepspeed(h, i, e, k), "hf mixtral block": _hf_mixtral(h, i, e, k)}
        x = torch.randn(1, t, h, dtype=dtype, requires_grad=True)
        grad = torch.randn(1, t, h, dtype=dtype)
        fns = {}
        for name, module in modules.items():
            if module is None:
                print(f"  ({name}: not installed, skipped)")
                continue
            module.to(dtype)
            fns[name] = _step(module, x, grad)
        times = interleaved(fns, ns.repeats)
        dense = min(times["dense equal-active"], times["dense (again)"])
        for name, sec in times.items():
            results.append({"dtype": dname, "layer": name, "ms": 1000 * sec, "vs_dense": sec / dense,
                            "deepspeed_over_this": times.get("deepspeed MoE", float("nan")) / sec})
    print_table(["dtype", "layer", "best fwd+bwd ms", "x dense", "deepspeed / this"],
                [[r["dtype"], r["layer"], r["ms"], r["vs_dense"], r["deepspeed_over_this"]] for r in results])
    ava32 = next((r for r in results if r["dtype"] == "fp32" and r["layer"] == "ava dropless"), None)
    if ava32:
        print(f"targets (fp32): ava/dense = {ava32['vs_dense']:.3f} (target <= 1.0: "
              f"{'met' if ava32['vs_dense'] <= 1.0 else 'NOT met'}); deepspeed/ava = "
              f"{ava32['deepspeed_over_this']:.3f} (target >= 1.2: "
              f"{'met' if ava32['deepspeed_over_this'] >= 1.2 else 'NOT met'})")
    write_json(ns.json, {"benchmark": "moe_layer", "shape": vars(ns), "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
