"""torch.compile for training: each transformer block compiled on its own, used only where it pays.

Why per block rather than the whole model: the blocks are identical, so
dynamo traces one and reuses its graph for the rest (one graph per kind of
attention when the enhanced features mix MoH, MoA and memory layers) (8 s of compilation for
`tiny.yaml` on 2 CPU cores instead of 21-57 s for the whole model), and the
embedding, output head and loss, which gain nothing from fusion, stay eager.
The fusions that pay are the small elementwise kernels between the matmuls:
norms, RoPE, SwiGLU, residual adds and the MoE combine.

Why only forwards without a KV cache (training, and evaluation, which costs
one recompile for no-grad mode): generation calls the blocks with a cache
whose length changes every token, which would recompile on every length until
dynamo gave up. The compiled callables are kept in a plain list,
not registered as submodules, so state dicts, ZeRO partitioning and
checkpoints see exactly the eager model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, TypeVar

import torch
from torch import nn

CompileSetting = Literal["auto"] | bool


def compile_pays(setting: CompileSetting, device: torch.device | str, zero_stage: int) -> bool:
    """Whether `training.compile` turns compilation on for a run on `device` under ZeRO `zero_stage`.

    `auto` means on a CUDA device under ZeRO-0/1/2 only. On CPU the measured
    gain (6-16% per step for tiny.yaml) takes 8-60 s of compilation to earn
    back, more than the short smoke runs CPUs are used for. Under ZeRO-3
    DeepSpeed gathers each submodule's parameters in hooks that are
    `torch.compiler.disable`d, so every block's graph breaks at every linear
    layer: many small graphs, nothing left to fuse. An explicit `true` still
    compiles, with `ZERO3_COMPILE_WARNING`.
    """
    if setting == "auto":
        return torch.device(device).type == "cuda" and zero_stage < 3
    return bool(setting)


T = TypeVar("T")


def run_outside_graph(run: Callable[..., T], *args: Any) -> T:
    """`run(*args)` eagerly, also when called from inside a compiled block: one graph break.

    For the data-dependent expert paths (MoE experts, MoA's per-expert
    projections, the expert-parallel all-to-all). Under torch.compile (torch
    2.13) grouped_mm's shape function accepts bf16 only, and the per-expert
    loops read counts to the host: traced, each new split of rows would be a
    recompile until dynamo gave up. One graph break around them costs far
    less. Outside compilation this is one function call and a flag test.
    """
    if torch.compiler.is_compiling():  # a constant while dynamo traces: the branch is resolved at trace time
        return _eager()(run, *args)
    return run(*args)


def _run_outside_graph(run: Callable[..., T], *args: Any) -> T:
    return run(*args)


_EAGER: list[Callable[..., Any]] = []  # the `torch.compiler.disable`d `_run_outside_graph`, made by `compile_blocks`


def _eager() -> Callable[..., Any]:
    """`_run_outside_graph` behind `torch.compiler.disable`, made once, when the first block is compiled.

    Not at import: `torch.compiler.disable` imports torch._dynamo, 1.5-3 s of
    start-up that a run which never compiles (every CPU run by default) would
    pay for nothing.
    """
    if not _EAGER:
        _EAGER.append(torch.compiler.disable(_run_outside_graph))
    return _EAGER[0]


ZERO3_COMPILE_WARNING = (
    "training.compile is true under ZeRO-3: DeepSpeed's parameter-gathering hooks break each block's graph at "
    "every linear layer, so compilation costs time and fuses little; set training.compile: auto (off under "
    "ZeRO-3) unless you have measured a gain")


def compile_blocks(layers: nn.ModuleList, backend: str = "inductor") -> list[Callable[..., object]]:
    """One compiled callable per block, sharing one graph; call them in place of the blocks when training.

    `dynamic=False`: a training run's shapes are fixed (batch x max_length),
    so static shapes give the best kernels; a changed shape (the evaluation
    batch) costs one recompile, not a slower dynamic graph everywhere.
    `backend` "aot_eager" traces exactly as training does but skips code
    generation: what the unit tests use to check Ava's side of compilation.
    """
    _eager()  # made before tracing starts, so dynamo finds it ready rather than tracing its creation
    return [torch.compile(block, dynamic=False, backend=backend) for block in layers]
