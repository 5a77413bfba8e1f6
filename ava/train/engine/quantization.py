"""NVFP4 quantization-aware training and the end-of-run conversion (`quantization:`), with torchao.

The model stays plain PyTorch; this module changes how its `nn.Linear`
layers compute, before DeepSpeed wraps the model, and converts them at the end.

NVFP4 (NVIDIA FP4): values in FP4 E2M1 (0, 0.5, 1, 1.5, 2, 3, 4, 6 and their
negatives) in blocks of 16 along the reduction dimension, each block scaled
by an FP8 E4M3 number, and the whole tensor by one fp32 scale.

What torchao (0.18, the version tested) offers, and what Ava uses of it:
- `torchao.prototype.qat.NVFP4FakeQuantizedLinear` (through
  `QATConfig(NVFP4DynamicActivationNVFP4WeightConfig(), step="prepare")`) runs
  its forward as a real FP4 matmul (`torch._scaled_mm` on float4_e2m1fn_x2
  operands): it works only on NVIDIA Blackwell (compute capability 10.0+,
  e.g. B200, GB200; its TODO says "support emulation on non-Blackwell GPUs"),
  fails on CPUs and H100s, and refuses weight-only training. Ava does not use it.
- `NVFP4Tensor.to_nvfp4` / `.dequantize`: NVFP4's rounding and scales, on any
  device. Ava's QAT (`NVFP4QATLinear`) uses exactly these numerics
  (`nvfp4_round_trip`, pinned bit for bit to them by the unit test): every
  forward rounds the weight (and, with `activations`, the input) to NVFP4 and
  multiplies the rounded values in the training precision; gradients pass
  straight through, as in torchao's backward (which also multiplies
  dequantized values). So Ava's NVFP4 is emulated on every device, Blackwell
  included: the same numbers, none of the FP4 speed.
- `quantize_(model, NVFP4WeightOnlyConfig())`: the conversion, on any device.
  Each weight becomes an `NVFP4Tensor` (packed FP4 data, one byte per two
  values, E4M3 block scales); its matmul dequantizes it. torchao's W4A4
  inference config (`NVFP4DynamicActivationNVFP4WeightConfig`) asserts a
  Blackwell GPU, so with `activations` the converted layers' inputs are
  rounded to NVFP4 by a forward pre-hook instead: the numbers Blackwell's
  FP4 matmul would multiply.

Kept in high precision, as for fp8 (`ava.train.engine.precision`): the output
head (its logits feed the loss; it may be tied to the embedding), router and
MoH gates (routing decisions), Linear layers whose widths are not multiples
of 16 (the NVFP4 block), and the MoE experts (stacked (E, in, out)
parameters, not `nn.Linear`: torchao's NVFP4 conversion takes 2-D weights).
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ava.config.schema import QuantizationConfig
from ava.errors import UserError
from ava.model.compile import run_outside_graph
from ava.model.moe.experts import GroupedExperts
from ava.train.engine.precision import quiet_import

NVFP4_BLOCK = 16  # values per E4M3 block scale, along the reduction dimension (in_features)
NVFP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # FP4 E2M1 magnitudes
FP4_MAX = 6.0
E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448
E4M3_TINY = torch.finfo(torch.float8_e4m3fn).tiny  # torchao's E4M3_EPS: the smallest block scale
REAL_FP4_HARDWARE = "NVIDIA Blackwell GPUs (compute capability 10.0+, e.g. B200, GB200)"
_MIN_AMAX = 1e-12  # an all-zero tensor's per-tensor scale would be 0, and its reciprocal inf (NaN after rounding)


def nvfp4_round_trip(tensor: torch.Tensor, per_tensor_scale: bool = True) -> torch.Tensor:
    """`tensor` rounded to NVFP4 and back, in its own dtype; blocks of 16 along the last dimension.

    Bit for bit what torchao's `NVFP4Tensor.to_nvfp4(...).dequantize()` gives
    (its `nvfp4_quantize`: fp32 block scales cast to E4M3, values scaled,
    clamped to +-6 and rounded to the nearest E2M1 value, ties to even; the
    unit test pins the equality), computed in fp32 whatever the tensor's
    dtype. Written out rather than called because torchao packs two FP4
    values a byte and unpacks them again (bit manipulation over many
    passes): 2.5x slower than this on a CPU, in every forward of QAT.
    """
    rows = tensor.detach().reshape(-1, tensor.shape[-1]).float()
    blocks = rows.reshape(rows.shape[0], -1, NVFP4_BLOCK)
    magnitude = blocks.abs()
    block_max = magnitude.amax(dim=-1)
    block_scale = block_max / FP4_MAX
    if per_tensor_scale:  # torchao's per_tensor_amax_to_scale: the block scales then span E4M3's whole range
        outer = block_max.amax().clamp(min=_MIN_AMAX) / (E4M3_MAX * FP4_MAX)
        inner = _to_e4m3(block_scale / outer)
        reciprocal, scale = (1.0 / outer) / inner, outer * inner
    else:
        scale = _to_e4m3(block_scale)
        reciprocal = 1.0 / scale
    magnitude.mul_(reciprocal.unsqueeze(-1)).clamp_(max=FP4_MAX)
    # E2M1's spacing is 0.5 below 2, 1 up to 4, 2 up to 6; an even multiple of it is an even mantissa, so
    # round() (half to even) rounds to nearest, ties to even, as torchao's f32_to_f4_unpacked.
    spacing = torch.where(magnitude < 2, 0.5, torch.where(magnitude < 4, 1.0, 2.0))
    rounded = magnitude.div_(spacing).round_().mul_(spacing).mul_(scale.unsqueeze(-1))
    return torch.copysign(rounded, blocks).reshape(tensor.shape).to(tensor.dtype)


def _to_e4m3(scale: torch.Tensor) -> torch.Tensor:
    """A block scale as FP8 E4M3 stores it (clamped to its smallest normal and largest value), in fp32."""
    return scale.clamp(min=E4M3_TINY, max=E4M3_MAX).to(torch.float8_e4m3fn).float()


class _StraightThrough(torch.autograd.Function):
    """Forward: the NVFP4 round trip. Backward: the gradient unchanged (straight-through estimator)."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, per_tensor_scale: bool) -> torch.Tensor:
        return nvfp4_round_trip(tensor, per_tensor_scale)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def fake_quantize(tensor: torch.Tensor, per_tensor_scale: bool = True) -> torch.Tensor:
    """NVFP4 fake quantization: the rounded values forward, the gradient straight through backward."""
    out: torch.Tensor = _StraightThrough.apply(tensor, per_tensor_scale)
    return out


class NVFP4QATLinear(nn.Linear):
    """An `nn.Linear` that computes with its weight (and input) rounded to NVFP4; same parameters, same names.

    `enabled = False` computes in high precision (the unquantized model's
    evaluation). The state dict is an `nn.Linear`'s, so checkpoints and the
    exported model are unaffected.
    """

    quantize_inputs: bool = True
    per_tensor_scale: bool = True
    enabled: bool = True

    @classmethod
    def from_linear(cls, linear: nn.Linear, quantize_inputs: bool, per_tensor_scale: bool) -> NVFP4QATLinear:
        """A fake-quantized layer sharing `linear`'s parameters (no copy)."""
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        new.weight, new.bias = linear.weight, linear.bias
        new.quantize_inputs, new.per_tensor_scale = quantize_inputs, per_tensor_scale
        new.train(linear.training)
        return new

    def to_linear(self) -> nn.Linear:
        """A plain `nn.Linear` sharing this layer's parameters."""
        plain = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        plain.weight, plain.bias = self.weight, self.bias
        plain.train(self.training)
        return plain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return super().forward(x)
        # Eager also inside a compiled block (one graph break): a fused graph may reorder the rounding's float
        # arithmetic, and it must stay torchao's bit for bit.
        return run_outside_graph(self._fake_quantized, x)

    def _fake_quantized(self, x: torch.Tensor) -> torch.Tensor:
        if self.quantize_inputs:
            x = fake_quantize(x, self.per_tensor_scale)
        return F.linear(x, fake_quantize(self.weight, self.per_tensor_scale), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, nvfp4 weights{' and inputs' if self.quantize_inputs else ''}"


@dataclass
class QuantizationReport:
    """What was quantized, and the end-of-run comparison; recorded in metrics.jsonl and summary.json."""

    format: str
    method: str  # qat or ptq
    activations: bool
    per_tensor_scale: bool
    modules: list[str] = field(default_factory=list)  # the Linear layers quantized, in model order
    high_precision_modules: list[str] = field(default_factory=list)  # "name (why)"
    real_fp4_device: bool = False  # this device has FP4 matrix units (Ava emulates NVFP4 on it anyway)
    weight_bytes: int | None = None  # the quantized layers' weights, before conversion
    quantized_weight_bytes: int | None = None  # the same weights as NVFP4Tensors (data + scales)
    unquantized_eval_loss: float | None = None
    quantized_eval_loss: float | None = None

    @property
    def scheme(self) -> str:
        return f"{self.format.upper()} {'W4A4' if self.activations else 'W4A16'}"

    def as_dict(self) -> dict[str, Any]:
        loss, base = self.quantized_eval_loss, self.unquantized_eval_loss
        return {"format": self.format, "method": self.method, "activations": self.activations,
                "per_tensor_scale": self.per_tensor_scale, "modules": len(self.modules),
                "high_precision_modules": self.high_precision_modules, "emulated": True,
                "real_fp4_hardware": REAL_FP4_HARDWARE, "real_fp4_device": self.real_fp4_device,
                "torchao": _torchao_version(), "weight_bytes": self.weight_bytes,
                "quantized_weight_bytes": self.quantized_weight_bytes,
                "unquantized_eval_loss": base, "quantized_eval_loss": loss,
                "degradation": loss - base if loss is not None and base is not None else None}

    def start_note(self) -> str:
        """The line printed before the first step."""
        what = ("fake-quantized in every forward (quantization-aware training)" if self.method == "qat"
                else "trained in high precision, quantized after the last step (post-training quantization)")
        where = ("this GPU has FP4 matrix units, but Ava emulates NVFP4 on every device" if self.real_fp4_device
                 else f"emulated: real FP4 matmuls need {REAL_FP4_HARDWARE}")
        return (f"quantization: {self.scheme}, {len(self.modules)} Linear layers {what}; "
                f"{len(self.high_precision_modules)} kept in high precision; {where}")

    def result_line(self) -> str:
        """The end-of-run comparison."""
        base, loss = self.unquantized_eval_loss, self.quantized_eval_loss
        assert base is not None and loss is not None
        size = (f"; weights {self.weight_bytes / 2**20:.2f} MiB -> {self.quantized_weight_bytes / 2**20:.2f} MiB"
                if self.weight_bytes and self.quantized_weight_bytes else "")
        return (f"held-out loss {base:.4f} unquantized, {loss:.4f} in {self.scheme} ({loss - base:+.4f}; "
                f"{self.method}, {len(self.modules)} Linear layers converted with torchao, emulated){size}")


def _keep_reason(name: str, module: nn.Linear) -> str | None:
    """Why this nn.Linear stays in high precision; None: it is quantized."""
    last = name.split(".")[-1]
    if last == "lm_head":
        return "output head: the logits feed the loss directly"
    if ".router." in name or name.endswith("router.gate") or last.endswith("_gate"):
        return "router gate: routing decisions stay in high precision"
    if module.in_features % NVFP4_BLOCK or module.out_features % NVFP4_BLOCK:
        return f"{module.in_features}x{module.out_features}: NVFP4 needs widths that are multiples of {NVFP4_BLOCK}"
    return None


def plan_quantization(model: nn.Module, config: QuantizationConfig,
                      device: str | torch.device | None = None) -> QuantizationReport:
    """Which Linear layers `config` quantizes, and which stay in high precision (with the reason)."""
    report = QuantizationReport(config.format, config.method, config.activations, config.per_tensor_scale,
                                real_fp4_device=_has_fp4_units(device))
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            reason = _keep_reason(name, module)
            if reason is None:
                report.modules.append(name)
            else:
                report.high_precision_modules.append(f"{name} ({reason})")
        elif isinstance(module, GroupedExperts):
            report.high_precision_modules.append(
                f"{name} (MoE experts: stacked weights, not Linear layers; torchao's NVFP4 conversion takes 2-D ones)")
    return report


def prepare_quantization(model: nn.Module, config: QuantizationConfig,
                         device: str | torch.device | None = None) -> QuantizationReport | None:
    """Plan `config` for `model` and, for QAT, swap the chosen Linear layers for `NVFP4QATLinear` in place.

    Call before DeepSpeed wraps the model: the parameters stay the same
    objects, so the optimizer, ZeRO and checkpoints see the plain model's.
    None when quantization is off.
    """
    if not config.enabled:
        return None
    _require_torchao_nvfp4()  # now, not after the whole run, when the end-of-run conversion needs it
    report = plan_quantization(model, config, device)
    if config.method == "qat":
        for name in report.modules:
            linear = _linear(model, name)
            _replace(model, name, NVFP4QATLinear.from_linear(linear, config.activations, config.per_tensor_scale))
    return report


def _require_torchao_nvfp4() -> None:
    """The torchao API the conversion uses (NVFP4WeightOnlyConfig, torchao 0.18), or a user error naming the fix."""
    try:
        version = importlib.metadata.version("torchao")
    except importlib.metadata.PackageNotFoundError:
        version = None
    try:
        with quiet_import():
            from torchao.prototype.mx_formats import NVFP4WeightOnlyConfig
            from torchao.quantization import quantize_  # noqa: F401
        NVFP4WeightOnlyConfig(use_dynamic_per_tensor_scale=True)
    except Exception as exc:  # missing, or an older torchao whose NVFP4 API differs
        found = f"torchao {version} is installed" if version else "torchao is not installed"
        raise UserError(f"quantization.format: nvfp4 converts the weights with torchao's NVFP4WeightOnlyConfig at the "
                        f"end of the run, but {found} and does not provide it ({type(exc).__name__}: {exc})",
                        "pip install 'torchao>=0.18' (the version tested), or set quantization.format: none") from None


def set_fake_quantization(model: nn.Module, enabled: bool) -> None:
    """Turn every `NVFP4QATLinear`'s rounding on or off (off: the unquantized model)."""
    for module in model.modules():
        if isinstance(module, NVFP4QATLinear):
            module.enabled = enabled


@torch.no_grad()
def convert(model: nn.Module, report: QuantizationReport) -> None:
    """Convert `report.modules` in place to NVFP4 with torchao: each weight becomes an `NVFP4Tensor`.

    QAT layers first become plain `nn.Linear` (torchao's QAT convert step
    does the same), then `quantize_(NVFP4WeightOnlyConfig)` quantizes their
    weights. With `report.activations` their inputs are rounded to NVFP4 too
    (a forward pre-hook: torchao's W4A4 path needs a Blackwell GPU). The
    model can then only be evaluated: its quantized weights have no gradient.
    """
    for name in report.modules:
        module = model.get_submodule(name)
        if isinstance(module, NVFP4QATLinear):
            _replace(model, name, module.to_linear())
    chosen = set(report.modules)
    report.weight_bytes = sum(_bytes(_linear(model, name).weight) for name in report.modules)
    with quiet_import():
        from torchao.prototype.mx_formats import NVFP4WeightOnlyConfig
        from torchao.quantization import quantize_
    quantize_(model, NVFP4WeightOnlyConfig(use_dynamic_per_tensor_scale=report.per_tensor_scale),
              filter_fn=lambda _module, name: name in chosen)
    report.quantized_weight_bytes = 0
    for name in report.modules:
        linear = _linear(model, name)
        report.quantized_weight_bytes += _bytes(linear.weight)
        if report.activations:
            linear.register_forward_pre_hook(_round_inputs(report.per_tensor_scale))


def _linear(model: nn.Module, name: str) -> nn.Linear:
    module = model.get_submodule(name)
    assert isinstance(module, nn.Linear)
    return module


def _round_inputs(per_tensor_scale: bool) -> Callable[[nn.Module, tuple[Any, ...]], tuple[Any, ...]]:
    def hook(_module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return (nvfp4_round_trip(args[0], per_tensor_scale), *args[1:])

    return hook


def _bytes(weight: torch.Tensor) -> int:
    """Bytes a weight occupies: an NVFP4Tensor's packed data and scales, or a plain tensor's elements."""
    parts = [getattr(weight, n, None) for n in ("qdata", "scale", "per_tensor_scale")]
    if parts[0] is None:
        parts = [weight]
    return sum(int(p.numel()) * int(p.element_size()) for p in parts if p is not None)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _has_fp4_units(device: str | torch.device | None) -> bool:
    """Whether the training device has FP4 matrix units (torchao's `is_sm_at_least_100`: compute capability 10.0+)."""
    if device is None:
        from deepspeed.accelerator import get_accelerator

        device = get_accelerator().device_name()
    kind = torch.device(device)
    if kind.type != "cuda" or not torch.cuda.is_available() or not torch.version.cuda:
        return False
    return torch.cuda.get_device_capability(kind.index) >= (10, 0)


def _torchao_version() -> str | None:
    try:
        return importlib.metadata.version("torchao")
    except importlib.metadata.PackageNotFoundError:
        return None
