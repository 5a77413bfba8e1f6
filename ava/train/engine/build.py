"""The one place a model becomes a DeepSpeed engine, for pre-training and for every RLHF role.

In order: ZeRO-3 leaf marks for routed modules (MoE, MoA, MoH routers: a
leaf is gathered whole, since a router reads its experts' weights directly),
the precision policy (fp8 converts matmuls in place), expert parallelism
(each rank keeps its own experts; before `deepspeed.initialize`), the engine
itself (whose optimizer leaves norms and biases undecayed: see
`ava.train.engine.param_groups`), then the process-wide host-memory setting and torch.compile, which
need the engine's device. A frozen model (an RLHF reference or reward model)
gets an engine without an optimizer, in eval mode.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ava.config.schema import AvaConfig
from ava.model.compile import ZERO3_COMPILE_WARNING, CompileSetting, compile_pays
from ava.train.engine.expert_parallel import expert_parallel_engine, prepare_expert_parallel
from ava.train.engine.host_memory import keep_freed_memory
from ava.train.engine.param_groups import decay_groups, describe
from ava.train.engine.precision import PrecisionReport, apply_precision

HOST_MEMORY_NOTE = ("host memory: freed blocks are kept for reuse (glibc malloc thresholds raised), so steps do not "
                    "page-fault fresh memory")


@dataclass
class Engine:
    """A model wrapped by DeepSpeed, with what was decided while building it; `name` labels it in logs."""

    name: str
    engine: Any  # deepspeed.DeepSpeedEngine
    zero_stage: int
    trainable: bool
    precision: PrecisionReport
    ds_config: dict
    compiled: bool = False

    @property
    def module(self) -> nn.Module:
        return self.engine.module

    @property
    def device(self) -> torch.device:
        return torch.device(self.engine.device)

    def autocast(self) -> contextlib.AbstractContextManager:
        """The context every forward runs in (Transformer Engine's fp8_autocast; nothing otherwise)."""
        return self.precision.autocast()


def build_engine(module: nn.Module, cfg: AvaConfig, ds_config: dict, *, name: str = "model", trainable: bool = True,
                 compile_setting: CompileSetting = False,
                 note: Callable[[str], None] | None = None, warn: Callable[[str], None] | None = None) -> Engine:
    """Wrap `module` in a DeepSpeed engine configured by `ds_config` (the JSON `ava.config` generated).

    `cfg` supplies the precision policy (training.mixed_precision and the
    deepspeed fp8 keys), expert parallelism (deepspeed.ep_size) and
    hardware.keep_freed_host_memory. `compile_setting` is training.compile
    for a pre-training run; RLHF passes False (its sequence lengths change
    every rollout, and a static graph would recompile for each). Notes about
    what was decided go to `note`, and a setting that works against itself to `warn`.
    """
    import deepspeed

    say = note or (lambda _: None)
    refuse_unsupported_fp16(ds_config)
    zero_stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))
    if zero_stage == 3:
        from ava.model.zero3 import mark_moe_zero3_leaves

        mark_moe_zero3_leaves(module)
    precision = apply_precision(module, cfg)
    for line in precision.notes:
        say(line)
    if trainable:
        t = cfg.training
        say(describe(module, t.weight_decay, t.weight_decay_exclude))
        parameters = prepare_expert_parallel(
            module, cfg.deepspeed.ep_size, lambda m: decay_groups(m, t.weight_decay, t.weight_decay_exclude))
        with expert_parallel_engine(module):
            engine, _, _, _ = deepspeed.initialize(model=module, model_parameters=parameters, config=ds_config)
    else:
        module.requires_grad_(False)
        engine, _, _, _ = deepspeed.initialize(model=module, config=ds_config)
        engine.eval()
    if trainable and _nothing_to_reduce(engine, zero_stage):
        # One rank at ZeRO 0: DeepSpeed would still flatten every gradient, "all-reduce" it over a group of one
        # and copy it back, each step: an identity that costs a pass over the gradients.
        engine.enable_backward_allreduce = False
    built = Engine(name, engine, zero_stage, trainable, precision, ds_config)
    if trainable and built.device.type == "cpu" and cfg.hardware.keep_freed_host_memory and keep_freed_memory():
        say(HOST_MEMORY_NOTE)
    use_compiled = getattr(module, "use_compiled_blocks", None)
    if trainable and use_compiled is not None and compile_pays(compile_setting, built.device, zero_stage):
        use_compiled()
        built.compiled = True
        if zero_stage == 3:
            (warn or say)(ZERO3_COMPILE_WARNING)
        say(f"torch.compile: on for the {len(module.layers)} transformer blocks (training.compile: "  # type: ignore[arg-type]
            f"{compile_setting}); the first step includes the compilation")
    return built


def refuse_unsupported_fp16(ds_config: dict) -> None:
    """fp16 where DeepSpeed's accelerator has none is a user error, not DeepSpeed's traceback from its sanity check.

    The config check judges the declared hardware (hardware.fp16); without a hardware config, or with one that
    says yes on a machine that has not, this is where the machine itself answers (`ava doctor` asks the same).
    """
    if not ds_config.get("fp16", {}).get("enabled"):
        return
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if not accelerator.is_fp16_supported():
        from ava.errors import UserError

        raise UserError(
            f"training.mixed_precision is fp16, but DeepSpeed's {type(accelerator).__name__} has no fp16 support on "
            "this machine (on a CPU: oneDNN has no fp16 kernels for it), so DeepSpeed would refuse to build the engine",
            "use --mixed_precision bf16 (or fp32); `ava doctor` shows what this machine supports")


def _nothing_to_reduce(engine: Any, zero_stage: int) -> bool:
    """Whether the engine's gradient all-reduce is an identity: ZeRO 0 on a single rank.

    Only where the reduction is all that `allreduce_gradients` does: an
    optimizer that also takes the accumulation boundary from it (bf16's) keeps it.
    """
    return (zero_stage == 0 and engine.dp_world_size == 1 and getattr(engine, "mpu", None) is None
            and not hasattr(engine.optimizer, "set_gradient_accumulation_boundary"))
