"""FP8 matmuls on a CPU: the product `torch._scaled_mm` computes, through a bf16 matmul.

Why not `torch._scaled_mm` itself (torch 2.13, issue 25): on a CPU it either
converts both FP8 operands to fp32 element by element, scales them and
multiplies in fp32 (CPUs without AMX: about 4x a bf16 matmul, and the
conversions alone cost as much again), or, on CPUs with AMX-INT8, hands them
to oneDNN's FP8 matmul, which without FP8 units is far slower still (tiny.yaml
logged 2 tokens/s and did not finish its first step in ten minutes).

What this module does instead, for the matmuls of torchao's FP8 training
(`Float8Linear` and the experts' `Fp8Matmul`): every E4M3 and E5M2 value is
exactly a bf16 value (fewer mantissa bits, a narrower exponent range), so the
FP8 operands become bf16 through a 256-entry table (an `index_select`: six times
faster than torch's element-wise float8 cast on a CPU), a bf16 matmul multiplies
exactly the FP8 values and accumulates in fp32, as `_scaled_mm` does, and the
dequantizing scales multiply its output. Everything else, the scales, the casts
and the three matmuls of forward and backward, stays torchao's: its autograd
function runs unchanged, and only its matmul of two FP8 tensors is computed here.

The one difference from `_scaled_mm`: the matmul's sum is rounded to bf16
before the scales multiply it and once more after, an extra rounding of at most
half a bf16 unit (2^-9 relative), sixty times finer than E4M3's own rounding
(2^-4 relative at worst, 2^-3 between adjacent values).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ava.model.compile import run_outside_graph

_aten = torch.ops.aten


@functools.cache
def _bf16_table(dtype: torch.dtype) -> torch.Tensor:
    """The bf16 value of each of the 256 bit patterns of `dtype` (NaN where the pattern is NaN)."""
    return torch.arange(256, dtype=torch.uint8).view(dtype).to(torch.bfloat16)


def fp8_to_bf16(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor.to(torch.bfloat16)` for an E4M3 or E5M2 CPU tensor, bit for bit, through a table lookup.

    A transposed (column-major) 2-D tensor, as torchao lays out the right
    operand, is converted as its contiguous transpose, without a copy.
    """
    if tensor.dim() == 2 and not tensor.is_contiguous() and tensor.t().is_contiguous():
        return fp8_to_bf16(tensor.t()).t()
    bits = tensor.contiguous().view(torch.uint8).reshape(-1).to(torch.int32)
    return _bf16_table(tensor.dtype).index_select(0, bits).view(tensor.shape)


def scaled_mm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
              out_dtype: torch.dtype, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`a @ b` of two FP8 matrices, divided by their scales (torchao's convention: FP8 = high precision x scale).

    Scales are tensorwise (one value) or rowwise (`a_scale` (M, 1), `b_scale`
    (1, N)), as `torch._scaled_mm` takes their reciprocals.
    """
    product = torch.mm(fp8_to_bf16(a), fp8_to_bf16(b))  # bf16 operands, fp32 accumulation, bf16 result
    out = product.float().mul_(a_scale.reciprocal() * b_scale.reciprocal())
    if bias is not None:
        out.add_(bias)
    return out.to(out_dtype)


@functools.cache
def _torchao() -> Any:
    """torchao's FP8 ops module, imported once on first use (not per matmul: this is the hot path)."""
    import torchao.float8.float8_ops as ops

    return ops


def _is_fp8_training_tensor(value: Any) -> bool:
    """A torchao FP8 tensor (FP8 `_data`, `_scale`, `_orig_dtype`): what its matmul dispatch receives."""
    return isinstance(value, _torchao().Float8TrainingTensor)


class _MatmulsHere(TorchDispatchMode):
    """Computes every matmul of two torchao FP8 tensors with `scaled_mm`; every other op runs as usual.

    The FP8 tensors' own dispatch (torchao's `float8_mm` / `float8_addmm`)
    would call `torch._scaled_mm`; a dispatch mode sees the op first. The
    operands are prepared by torchao's `preprocess_addmm`, so the layout and
    the scales (a tensorwise scale repeated against a rowwise one) are
    torchao's choices, not copies of them.
    """

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in (_aten.mm.default, _aten.matmul.default) and all(map(_is_fp8_training_tensor, args[:2])):
            return self._scaled(args[0], args[1], None)
        if func is _aten.addmm.default and all(map(_is_fp8_training_tensor, args[1:3])) and not kwargs:
            return self._scaled(args[1], args[2], args[0])
        return func(*args, **kwargs)

    @staticmethod
    def _scaled(a: Any, b: Any, bias: torch.Tensor | None) -> torch.Tensor:
        a_data, a_scale, b_data, b_scale = _torchao().preprocess_addmm(a, b)
        return scaled_mm(a_data, a_scale, b_data, b_scale, a._orig_dtype, bias)


@functools.cache
def cpu_matmul_function() -> type[torch.autograd.Function]:
    """torchao's FP8 matmul autograd function (`matmul_with_hp_or_float8_args`) with its matmuls computed here.

    Forward and backward run torchao's own, inside the dispatch mode: same
    casts, same scales, same three matmuls. Built on first use, so importing
    this module does not import torchao.
    """
    from torchao.float8.float8_linear import matmul_with_hp_or_float8_args as torchao_function

    class CpuFp8Matmul(torchao_function):
        @staticmethod
        def forward(ctx: Any, *args: Any) -> Any:
            with _MatmulsHere():
                return torchao_function.forward(ctx, *args)

        @staticmethod
        def backward(ctx: Any, *grads: Any) -> Any:
            with _MatmulsHere():
                return torchao_function.backward(ctx, *grads)

    return CpuFp8Matmul


def use_cpu_matmuls(linear: torch.nn.Module) -> None:
    """Make a torchao `Float8Linear` compute its FP8 matmuls with `scaled_mm` (its class becomes a subclass
    that changes only `forward`; parameters, config and state dict are untouched)."""
    linear.__class__ = _cpu_float8_linear_class()


@functools.cache
def _cpu_float8_linear_class() -> type:
    """torchao's `Float8Linear` with `forward` calling `cpu_matmul_function()`; cached, so every converted
    layer has one class (and `isinstance(layer, Float8Linear)` still holds)."""
    from torchao.float8.float8_linear import Float8Linear

    function = cpu_matmul_function()

    def forward(self: Any, input: torch.Tensor) -> torch.Tensor:
        # Float8Linear.forward with the CPU function: its autocast cast, the matmul, then the bias.
        if torch.is_autocast_enabled():
            input = input.to(torch.get_autocast_gpu_dtype())
        output = run_outside_graph(function.apply, input, self.weight.t(), self.linear_mm_config, self.config)
        return output if self.bias is None else output + self.bias.to(output.dtype)

    return type("CpuFloat8Linear", (Float8Linear,), {"forward": forward, "__module__": __name__,
                                             "__doc__": "torchao's Float8Linear, its FP8 matmuls computed by "
                                                        "ava.train.engine.fp8_cpu.scaled_mm."})
