"""NVFP4 quantization (`quantization:`): the fake quantization rounds to NVFP4 exactly as torchao does, training
gets straight-through gradients, and the conversion stores torchao `NVFP4Tensor`s that compute what QAT computed."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ava.config import ConfigError, ConfigFiles, WorldSize, load_config
from ava.config.schema import ModelConfig, QuantizationConfig
from ava.model import AvaForCausalLM
from ava.train.engine.quantization import (
    NVFP4_BLOCK,
    NVFP4_VALUES,
    NVFP4QATLinear,
    convert,
    nvfp4_round_trip,
    prepare_quantization,
    set_fake_quantization,
)
from tests.conftest import REPO

TIES = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, -0.25, -0.75, -1.25, -1.75, -2.5, -3.5, -5.0, 0.0]


def _torchao_round_trip(t: torch.Tensor, per_tensor_scale: bool) -> torch.Tensor:
    from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor, per_tensor_amax_to_scale

    rows = t.reshape(-1, t.shape[-1]).float().contiguous()
    scale = per_tensor_amax_to_scale(rows.abs().amax()) if per_tensor_scale else None
    return NVFP4Tensor.to_nvfp4(rows, per_tensor_scale=scale).dequantize(torch.float32).reshape(t.shape).to(t.dtype)


def _model(**kw) -> AvaForCausalLM:
    torch.manual_seed(0)
    cfg = ModelConfig(hidden_size=64, num_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=256,
                      max_position_embeddings=64, num_experts=1, **kw)
    return AvaForCausalLM(cfg)


@pytest.mark.parametrize("per_tensor_scale", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("magnitude", [1e-3, 1.0, 1e4])
def test_round_trip_is_bit_for_bit_torchaos_nvfp4tensor(per_tensor_scale, dtype, magnitude):
    torch.manual_seed(1)
    x = torch.randn(3, 40, 64) * magnitude
    x[0, 0, :16] = torch.tensor(TIES) * magnitude  # exact ties: E2M1 rounds them to the even mantissa
    x = x.to(dtype)
    assert torch.equal(nvfp4_round_trip(x, per_tensor_scale), _torchao_round_trip(x, per_tensor_scale))


def test_fake_quantized_weights_are_fp4_values_times_block_scales():
    torch.manual_seed(2)
    linear = NVFP4QATLinear.from_linear(nn.Linear(64, 32), quantize_inputs=True, per_tensor_scale=True)
    w = linear.weight.detach()
    rounded = nvfp4_round_trip(w).reshape(32, -1, NVFP4_BLOCK)
    # Each block's scale: the per-tensor fp32 scale times an E4M3 number.
    outer = w.abs().amax() / (448.0 * 6.0)
    inner = (w.reshape(32, -1, NVFP4_BLOCK).abs().amax(-1) / 6.0 / outer).to(torch.float8_e4m3fn).float()
    units = rounded / (outer * inner).unsqueeze(-1)
    grid = torch.tensor(NVFP4_VALUES)
    nearest = (units.abs().unsqueeze(-1) - grid).abs().min(-1).values
    assert nearest.max() < 1e-5  # every value is an FP4 E2M1 value times its block's scale
    assert len(torch.unique(units.abs().round(decimals=4))) <= len(NVFP4_VALUES)
    assert not torch.equal(rounded.reshape(w.shape), w)


def test_qat_linear_computes_with_rounded_operands_and_passes_gradients_straight_through():
    torch.manual_seed(3)
    plain = nn.Linear(64, 32)
    qat = NVFP4QATLinear.from_linear(plain, quantize_inputs=True, per_tensor_scale=True)
    assert qat.weight is plain.weight and qat.bias is plain.bias  # shared: the optimizer and ZeRO see the same
    x = torch.randn(4, 5, 64, requires_grad=True)
    y = qat(x)
    wq, xq = nvfp4_round_trip(plain.weight), nvfp4_round_trip(x)
    assert torch.allclose(y, xq @ wq.T + plain.bias, atol=1e-6)
    assert not torch.allclose(y, plain(x), atol=1e-3)
    g = torch.randn_like(y)
    y.backward(g)
    # torchao's NVFP4 QAT backward: gradients from the dequantized operands, passed straight to the originals.
    flat_g, flat_xq = g.reshape(-1, 32), xq.reshape(-1, 64)
    assert torch.allclose(plain.weight.grad, flat_g.T @ flat_xq, atol=1e-5)
    assert torch.allclose(x.grad, g @ wq, atol=1e-5)
    qat.enabled = False  # the unquantized model
    assert torch.allclose(qat(x), plain(x))


def test_prepare_keeps_the_output_head_and_narrow_layers_in_high_precision():
    model = _model()
    report = prepare_quantization(model, QuantizationConfig(format="nvfp4"), device="cpu")
    assert report is not None and len(report.modules) == 14  # 2 blocks x (q, k, v, o, gate, up, down)
    assert isinstance(model.layers[0].attn.q_proj, NVFP4QATLinear)
    assert isinstance(model.lm_head, nn.Linear) and not isinstance(model.lm_head, NVFP4QATLinear)
    assert report.high_precision_modules == ["lm_head (output head: the logits feed the loss directly)"]
    assert set(model.state_dict()) == set(_model().state_dict())  # checkpoints and export are unaffected
    assert prepare_quantization(_model(), QuantizationConfig(), device="cpu") is None  # format: none


@pytest.mark.parametrize("activations", [True, False])
def test_conversion_stores_nvfp4tensors_that_compute_what_qat_computed(activations):
    from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor

    model = _model().eval()
    report = prepare_quantization(model, QuantizationConfig(format="nvfp4", activations=activations), device="cpu")
    assert report is not None
    tokens = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        fake_quantized = model(tokens, labels=tokens).lm_loss
        set_fake_quantization(model, False)
        unquantized = model(tokens, labels=tokens).lm_loss
        high_precision = model.layers[0].ffn.up_proj.weight.detach().clone()
        convert(model, report)
        converted = model(tokens, labels=tokens).lm_loss
    up = model.layers[0].ffn.up_proj
    assert type(up) is nn.Linear and isinstance(up.weight, NVFP4Tensor) and not up.weight.requires_grad
    assert up.weight.qdata.dtype == torch.uint8 and up.weight.qdata.shape == (128, 32)  # two FP4 values a byte
    assert up.weight.scale.dtype == torch.float8_e4m3fn
    assert torch.equal(up.weight.dequantize(torch.float32), nvfp4_round_trip(high_precision))
    assert report.quantized_weight_bytes is not None and report.weight_bytes is not None
    assert report.quantized_weight_bytes < report.weight_bytes / 5  # fp32 -> ~4.5 bits a weight
    assert torch.allclose(converted, fake_quantized, atol=1e-5)
    assert converted != unquantized


def test_ptq_leaves_training_in_high_precision_and_converts_at_the_end():
    model = _model().eval()
    report = prepare_quantization(model, QuantizationConfig(format="nvfp4", method="ptq"), device="cpu")
    assert report is not None and len(report.modules) == 14
    assert not any(isinstance(m, NVFP4QATLinear) for m in model.modules())
    weight = model.layers[1].attn.o_proj.weight.detach().clone()
    convert(model, report)
    assert torch.equal(model.layers[1].attn.o_proj.weight.dequantize(torch.float32), nvfp4_round_trip(weight))


@pytest.mark.parametrize(("override", "said"), [
    (["--mixed_precision", "fp8"], "would both rewrite the same Linear layers"),
    (["--zero_stage", "3"], "ZeRO-3 leaves each rank only a shard"),
    (["--training.lora.enabled", "true"], "QLoRA"),
])
def test_nvfp4_is_refused_where_it_cannot_work(override, said):
    files = ConfigFiles(str(REPO / "configs/research/quantization_nvfp4.yaml"), str(REPO / "configs/hardware/cpu.yaml"))
    load_config(files, world=WorldSize(1, "test"))  # as shipped: valid
    with pytest.raises(ConfigError) as caught:
        load_config(files, override, world=WorldSize(1, "test"))
    problems = [p for p in caught.value.problems if p.key == "quantization.format"]
    assert len(problems) == 1 and said in problems[0].render()


def test_a_torchao_without_the_nvfp4_conversion_is_refused_before_training_not_after(monkeypatch):
    import sys

    from ava.errors import UserError

    monkeypatch.setitem(sys.modules, "torchao.prototype.mx_formats", None)  # as if torchao lacked the module
    with pytest.raises(UserError) as caught:
        prepare_quantization(_model(), QuantizationConfig(format="nvfp4"), device="cpu")
    assert "torchao>=0.18" in caught.value.fix and "quantization.format: none" in caught.value.fix
