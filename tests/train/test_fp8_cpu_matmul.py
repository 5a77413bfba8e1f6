"""FP8 on a CPU computes its matmuls as a bf16 matmul of the FP8 values (`ava.train.engine.fp8_cpu`).

What it must keep: the exact FP8 values (the table conversion is torch's cast,
bit for bit), torch._scaled_mm's product within one extra bf16 rounding, and
torchao's casts and scales around it (a layer converted for a CPU tracks
torchao's own layer forward and backward). What it must avoid: torch._scaled_mm
itself, whose CPU fallbacks made a tiny.yaml fp8 step take minutes (issue 25).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from ava.config.schema import AvaConfig
from ava.model import AvaForCausalLM
from ava.train.engine.fp8_cpu import fp8_to_bf16, scaled_mm, use_cpu_matmuls
from ava.train.engine.precision import apply_precision, torchao_config

pytest.importorskip("torchao.float8")
from torchao.float8.float8_linear import Float8Linear  # noqa: E402

FP8 = [torch.float8_e4m3fn, torch.float8_e5m2]


@pytest.mark.parametrize("dtype", FP8, ids=["e4m3fn", "e5m2"])
def test_the_table_gives_torchs_bf16_value_for_every_fp8_bit_pattern(dtype):
    every = torch.arange(256, dtype=torch.uint8).view(dtype)
    got, expected = fp8_to_bf16(every), every.to(torch.bfloat16)
    assert torch.equal(got.isnan(), expected.isnan())
    assert torch.equal(got[~got.isnan()].view(torch.int16), expected[~expected.isnan()].view(torch.int16))
    # A column-major operand (torchao's layout for the right-hand matrix) converts as itself.
    grid = every[:240].reshape(16, 15).t()
    assert not grid.is_contiguous() and torch.equal(fp8_to_bf16(grid).float().nan_to_num(7.0),
                                                    grid.to(torch.bfloat16).float().nan_to_num(7.0))


def _operands(rowwise: bool) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(0)
    a = (torch.randn(40, 64, generator=gen) * 3).to(torch.float8_e4m3fn)
    b = (torch.randn(48, 64, generator=gen) * 3).to(torch.float8_e4m3fn).t()  # column-major, as _scaled_mm wants
    if rowwise:
        a_scale = torch.rand(40, 1, generator=gen) + 0.5
        b_scale = torch.rand(1, 48, generator=gen) + 0.5
    else:
        a_scale, b_scale = torch.tensor(1.7), torch.tensor(0.3)
    return a, a_scale, b, b_scale


@pytest.mark.parametrize("rowwise", [False, True], ids=["tensorwise", "rowwise"])
def test_the_product_is_torch_scaled_mms_within_one_extra_bf16_rounding(rowwise):
    a, a_scale, b, b_scale = _operands(rowwise)
    bias = torch.randn(48)
    # torch._scaled_mm takes the reciprocal scales (high precision = FP8 x scale).
    expected = torch._scaled_mm(a, b, scale_a=a_scale.reciprocal(), scale_b=b_scale.reciprocal(),
                                out_dtype=torch.float32)
    got = scaled_mm(a, a_scale, b, b_scale, torch.float32)
    # The products are exact and both accumulate in fp32: what differs is the sum's rounding to bf16 before the
    # scales (half a bf16 unit, 2^-9 relative), and the accumulation order (relative to the row's magnitude).
    tolerance = 2.0**-8 * expected.abs() + 1e-5 * expected.abs().max()
    assert ((got - expected).abs() <= tolerance).all()
    assert not torch.equal(got, expected) or rowwise  # tensorwise scales are not powers of two: rounded once more
    with_bias = scaled_mm(a, a_scale, b, b_scale, torch.bfloat16, bias=bias)
    assert with_bias.dtype == torch.bfloat16
    assert torch.allclose(with_bias.float(), (got + bias), rtol=2.0**-7, atol=1e-3)


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_a_layer_converted_for_the_cpu_tracks_torchaos_layer_forward_and_backward(recipe):
    torch.manual_seed(0)
    config = torchao_config(recipe)
    linear = nn.Linear(64, 48, bias=True, dtype=torch.bfloat16)
    reference = Float8Linear.from_float(copy.deepcopy(linear), config=config)
    cpu = Float8Linear.from_float(copy.deepcopy(linear), config=config)
    use_cpu_matmuls(cpu)
    assert isinstance(cpu, Float8Linear) and set(cpu.state_dict()) == {"weight", "bias"}
    x = torch.randn(50, 64, dtype=torch.bfloat16)
    grad = torch.randn(50, 48, dtype=torch.bfloat16)
    results = []
    for layer in (reference, cpu):
        inp = x.clone().requires_grad_()
        out = layer(inp)
        out.backward(grad)
        results.append((out.float(), inp.grad.float(), layer.weight.grad.float()))
    for got, expected in zip(results[1], results[0], strict=True):
        # One extra bf16 rounding per matmul (forward, grad input, grad weight): a few bf16 units at most.
        assert float((got - expected).abs().max() / expected.abs().max()) < 2.0**-6


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_an_fp8_training_step_on_a_cpu_never_calls_torch_scaled_mm(recipe, monkeypatch):
    config = AvaConfig.model_validate({
        "model": {"hidden_size": 64, "num_layers": 2, "num_attention_heads": 4, "intermediate_size": 128,
                  "vocab_size": 64, "max_position_embeddings": 32, "num_experts": 4, "num_experts_per_token": 2},
        "training": {"mixed_precision": "fp8"}, "deepspeed": {"fp8_recipe": recipe}})
    torch.manual_seed(0)
    model = AvaForCausalLM(config.model)
    report = apply_precision(model, config, device="cpu")
    model = model.to(torch.bfloat16)
    calls = []

    def refuse(*args: object, **kwargs: object) -> None:
        calls.append(args)
        raise AssertionError("torch._scaled_mm called on a CPU")

    monkeypatch.setattr(torch, "_scaled_mm", refuse)
    ids = torch.randint(0, 64, (2, 32), generator=torch.Generator().manual_seed(1))
    loss = model(ids, labels=ids).loss
    loss.backward()
    assert not calls and torch.isfinite(loss)
    assert any("attn" in n for n in report.fp8_modules) and any("experts" in n for n in report.fp8_modules)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
