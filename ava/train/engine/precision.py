"""Training precision applied to the model before DeepSpeed wraps it: what runs in which format.

fp32, fp16 and bf16 are DeepSpeed's business (its JSON enables bf16/fp16 and
loss scaling); fp8 also converts the model's matmuls here, on top of bf16:
DeepSpeed keeps bf16 weights and fp32 master weights as for bf16, and each
converted matmul casts its bf16 operands to float8 with fresh scales on every
call (dynamic scaling), computes in FP8 and returns bf16.

With the torchao backend (`torchao.float8`):
- every eligible `nn.Linear` becomes torchao's `Float8Linear`, which keeps the
  same `weight` parameter (ZeRO partitions and checkpoints it as before);
- the MoE experts, stacked (E, in, out) parameters run by a grouped matmul,
  are not `nn.Linear`: they run one FP8 matmul per expert through the autograd
  function `Float8Linear` itself uses (`matmul_with_hp_or_float8_args`), with
  the same recipe. torchao's grouped FP8 (`torchao.prototype.moe_training`)
  is not used: it swaps the parameters for tensor subclasses, which DeepSpeed
  ZeRO cannot flatten, and needs SM90;
- on a CPU both compute their FP8 matmuls with `ava.train.engine.fp8_cpu`
  (a bf16 matmul of the FP8 values) instead of `torch._scaled_mm`, whose CPU
  fallbacks made a tiny.yaml step take minutes.
Kept in high precision: the router gates (routing decisions flip on small
logit changes; `Router` computes them in fp32 anyway), the output head (the
logits feed the loss directly; it may also be tied to the embedding) and any
matmul whose widths are not multiples of 16 (`torch._scaled_mm` requires it).

torchao internals this relies on (`Fp8Matmul`, `fp8_cpu`; unchanged from
torchao 0.10 to 0.18, the version tested): the autograd function
`torchao.float8.float8_linear.matmul_with_hp_or_float8_args`, the way
`Float8Linear.__init__` builds its `LinearMMConfig` and its `forward`, and
`torchao.float8.float8_ops.preprocess_addmm`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ava.config.errors import ConfigError, Problem
from ava.config.schema import AvaConfig
from ava.model.moe.experts import GroupedExperts

FP8_ALIGNMENT = 16  # torch._scaled_mm: both dimensions of each operand multiples of 16
TORCHAO_RECIPES = ("tensorwise", "rowwise")


@dataclass
class PrecisionReport:
    """What a run trains in: recorded in summary.json and printed once at start."""

    precision: str  # fp32, fp16, bf16 or fp8
    backend: str | None = None  # fp8 only: torchao or transformer_engine
    recipe: str | None = None  # fp8 with torchao: tensorwise or rowwise
    emulated: bool = False  # fp8 on hardware without FP8 matrix units
    fp8_modules: list[str] = field(default_factory=list)
    high_precision_modules: list[str] = field(default_factory=list)  # "name (why)"
    notes: list[str] = field(default_factory=list)  # printed once at start
    # Makes the context each forward runs in (Transformer Engine's fp8_autocast); None: no context.
    autocast_factory: Callable[[], contextlib.AbstractContextManager] | None = field(
        default=None, repr=False, compare=False)

    def as_dict(self) -> dict[str, Any]:
        return {"precision": self.precision, "backend": self.backend, "recipe": self.recipe,
                "emulated": self.emulated, "fp8_modules": len(self.fp8_modules),
                "high_precision_modules": self.high_precision_modules, "notes": self.notes}

    def autocast(self) -> contextlib.AbstractContextManager:
        """The context every forward runs in (Transformer Engine's fp8_autocast; nothing otherwise)."""
        return self.autocast_factory() if self.autocast_factory is not None else contextlib.nullcontext()


def apply_precision(model: nn.Module, config: AvaConfig, *, device: str | torch.device | None = None
                    ) -> PrecisionReport:
    """Prepare `model` for `training.mixed_precision`; fp8 converts its matmuls in place.

    `device` is where the model will train (default: DeepSpeed's accelerator);
    it decides whether FP8 runs on FP8 matrix units or is emulated. Raises
    `ConfigError` for `fp8_backend: transformer_engine` where Transformer
    Engine cannot run.
    """
    precision = config.training.mixed_precision
    if precision != "fp8":
        return PrecisionReport(precision)
    ds = config.deepspeed
    device_type, device_name, has_fp8_units = _describe_device(device)
    if ds.fp8_backend == "transformer_engine":
        return _apply_transformer_engine(model, ds.fp8_margin, device_type)
    report = PrecisionReport("fp8", backend="torchao", recipe=ds.fp8_recipe, emulated=not has_fp8_units)
    # The FP8 matmuls: torch._scaled_mm on FP8 units; on a CPU, a bf16 matmul of the FP8 values
    # (ava.train.engine.fp8_cpu: _scaled_mm there is an fp32 or oneDNN fallback many times slower);
    # elsewhere (CUDA before Ada) torchao's emulation: dequantise, then an fp32 matmul.
    on_cpu = device_type == "cpu"
    fp8_config = torchao_config(ds.fp8_recipe, emulate=not (has_fp8_units or on_cpu))
    _convert_torchao(model, fp8_config, report, cpu_matmuls=on_cpu)
    if report.emulated:
        how = "a bf16 matmul of the FP8 values" if on_cpu else "an fp32 matmul of the FP8 values"
        report.notes.append(f"fp8: {device_name} has no FP8 matrix units; FP8 matmuls are emulated with {how} "
                            "(same casts and scales, slower than bf16)")
    if ds.fp8_margin:
        report.notes.append(f"fp8: deepspeed.fp8_margin = {ds.fp8_margin} has no effect with fp8_backend torchao, "
                            "which scales from each tensor's current maximum (the margin is for Transformer "
                            "Engine's delayed scaling)")
    report.notes.insert(0, _summary_note(report))
    return report


def torchao_config(recipe: str, emulate: bool = False) -> Any:
    """torchao's `Float8LinearConfig` for `recipe` (tensorwise or rowwise scaling)."""
    if recipe not in TORCHAO_RECIPES:
        raise ValueError(f"unknown fp8 recipe {recipe!r}: expected one of {TORCHAO_RECIPES}")
    config = _torchao_float8().Float8LinearConfig.from_recipe_name(recipe)
    return dataclasses.replace(config, emulate=emulate) if emulate else config


class Fp8Matmul:
    """`rows @ weight` (weight (in, out)) in FP8 with torchao's autograd function, as `Float8Linear` computes it.

    `Float8Linear.forward` calls `matmul_with_hp_or_float8_args(input, weight.t(), ...)`:
    an expert's (in, out) weight is that `weight.t()`. The `LinearMMConfig` is
    built the way `Float8Linear.__init__` builds it.
    """

    def __init__(self, config: Any, cpu_matmuls: bool = False) -> None:
        """`cpu_matmuls`: compute the FP8 matmuls with `ava.train.engine.fp8_cpu` (as `Float8Linear` layers
        converted for a CPU do) instead of `torch._scaled_mm`."""
        f8 = _torchao_float8()
        from torchao.float8.float8_linear import matmul_with_hp_or_float8_args

        def gemm(gemm_config: Any) -> Any:
            return f8.ScaledMMConfig(config.emulate, gemm_config.use_fast_accum, False, config.pad_inner_dim)

        self.config = config
        self.mm_config = f8.LinearMMConfig(gemm(config.gemm_config_output), gemm(config.gemm_config_grad_input),
                                           gemm(config.gemm_config_grad_weight))
        self.function = matmul_with_hp_or_float8_args
        if cpu_matmuls:
            from ava.train.engine.fp8_cpu import cpu_matmul_function

            self.function = cpu_matmul_function()

    def __call__(self, rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return self.function.apply(rows, weight, self.mm_config, self.config)


def _keep_reason(name: str, module: nn.Linear) -> str | None:
    """Why this nn.Linear stays in high precision; None: it converts."""
    if name.split(".")[-1] == "lm_head":
        return "output head: the logits feed the loss directly"
    if name.endswith("router.gate") or ".router." in name:
        return "router gate: routing decisions stay in fp32"
    if module.in_features % FP8_ALIGNMENT or module.out_features % FP8_ALIGNMENT:
        return f"{module.in_features}x{module.out_features}: FP8 matmuls need multiples of {FP8_ALIGNMENT}"
    return None


def _plan(model: nn.Module, report: PrecisionReport, experts_reason: str | None = None) -> tuple[list[str], list[str]]:
    """The nn.Linear and the experts modules to convert, in model order; the others go to `report` with the reason.

    `experts_reason`: why no experts convert (a backend without an FP8 path for them).
    """
    linears: list[str] = []
    experts: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            reason = _keep_reason(name, module)
            chosen = linears
        elif isinstance(module, GroupedExperts):
            widths = "x".join(map(str, module.widths))
            reason = experts_reason or (f"experts {widths}: FP8 matmuls need multiples of {FP8_ALIGNMENT}"
                                        if any(w % FP8_ALIGNMENT for w in module.widths) else None)
            chosen = experts
        else:
            continue
        if reason is None:
            chosen.append(name)
            report.fp8_modules.append(name)
        else:
            report.high_precision_modules.append(f"{name} ({reason})")
    return linears, experts


def _convert_torchao(model: nn.Module, config: Any, report: PrecisionReport, cpu_matmuls: bool = False) -> None:
    linears, experts = _plan(model, report)
    convert = set(linears)
    _torchao_float8().convert_to_float8_training(model, config=config,
                                                 module_filter_fn=lambda _module, name: name in convert)
    if cpu_matmuls:
        from ava.train.engine.fp8_cpu import use_cpu_matmuls

        for name in linears:
            use_cpu_matmuls(model.get_submodule(name))
    if experts:
        matmul = Fp8Matmul(config, cpu_matmuls=cpu_matmuls)
        for name in experts:
            module = model.get_submodule(name)
            assert isinstance(module, GroupedExperts)
            module.use_fp8(matmul)


def _summary_note(report: PrecisionReport) -> str:
    scaling = f", {report.recipe} scaling" if report.recipe else ""
    return (f"fp8 ({report.backend}{scaling}): {len(report.fp8_modules)} modules compute in FP8 on top of bf16, "
            f"{len(report.high_precision_modules)} stay in high precision (router gates, output head, "
            f"widths not multiples of {FP8_ALIGNMENT})")


def _describe_device(device: str | torch.device | None) -> tuple[str, str, bool]:
    """(device type, a name for messages, whether it has FP8 matrix units)."""
    if device is None:
        from deepspeed.accelerator import get_accelerator

        device = get_accelerator().device_name()
    kind = torch.device(device).type
    if kind == "cuda" and torch.cuda.is_available():
        index = torch.device(device).index
        major, minor = torch.cuda.get_device_capability(index)
        # FP8 tensor cores: Ada (8.9), Hopper (9.0) and later; AMD (ROCm) reports its own capabilities.
        return kind, torch.cuda.get_device_name(index), (major, minor) >= (8, 9)
    return kind, "CPU" if kind == "cpu" else kind, False


class _ImportNoise(logging.Filter):
    """torchao's import logs a warning per optional CUDA kernel library it cannot load (expected on CPU and
    older GPUs), and torch warns about an Enum torchao registers as a pytree constant; both are harmless."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        optional_kernels = message.startswith("Failed to load") and "torchao" in message and "_C" in message
        return not (optional_kernels or "is an Enum subclass and is now natively supported" in message)


@contextlib.contextmanager
def quiet_import() -> Iterator[None]:
    loggers = [logging.getLogger("torchao"), logging.getLogger("torch.utils._pytree")]
    noise = _ImportNoise()
    for logger in loggers:
        logger.addFilter(noise)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(noise)


def _torchao_float8() -> Any:
    """`torchao.float8`, imported on first use only (only fp8 runs pay for it) and without its import noise."""
    with quiet_import():
        import torchao.float8
    return torchao.float8


def _transformer_engine_problem(reason: str) -> ConfigError:
    return ConfigError([Problem(
        "", "deepspeed.fp8_backend",
        f"fp8 with Transformer Engine needs {reason}",
        "install transformer-engine (pip install transformer-engine[pytorch]) and train on an NVIDIA GPU, "
        "or use fp8_backend: torchao, which runs on any device", "transformer_engine")])


def _apply_transformer_engine(model: nn.Module, margin: int, device_type: str) -> PrecisionReport:
    """Swap eligible nn.Linear for Transformer Engine's, which run FP8 inside `te.fp8_autocast`."""
    if device_type != "cuda" or not torch.cuda.is_available():
        raise _transformer_engine_problem(f"an NVIDIA GPU, and this run's device is {device_type}")
    if importlib.util.find_spec("transformer_engine") is None:
        raise _transformer_engine_problem("the transformer_engine package, which is not installed")
    import transformer_engine.pytorch as te
    from transformer_engine.common.recipe import DelayedScaling, Format

    report = PrecisionReport("fp8", backend="transformer_engine")
    linears, _ = _plan(model, report, experts_reason="experts: the Transformer Engine backend converts nn.Linear only")
    for name in linears:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old: nn.Linear = getattr(parent, child)
        new = te.Linear(old.in_features, old.out_features, bias=old.bias is not None,
                        params_dtype=old.weight.dtype, device="cuda")
        with torch.no_grad():
            new.weight.copy_(old.weight)
            if old.bias is not None:
                new.bias.copy_(old.bias)
        setattr(parent, child, new)
    recipe = DelayedScaling(margin=margin, fp8_format=Format.HYBRID)
    report.autocast_factory = functools.partial(te.fp8_autocast, enabled=True, fp8_recipe=recipe)
    report.notes.append(_summary_note(report) + f"; delayed scaling, margin {margin}")
    return report
