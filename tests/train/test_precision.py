"""What `apply_precision` does to a model: which matmuls run in FP8, which stay in high precision and why.

Small models on CPU, where FP8 is emulated (test_fp8_cpu_matmul: how); the
multi-rank training runs are in test_fp8_zero.
"""

from __future__ import annotations

import copy
import importlib.util
import subprocess
import sys

import pytest
import torch
from torch import nn

from ava.config import ConfigError
from ava.config.schema import AvaConfig
from ava.model import AvaForCausalLM
from ava.model.moe.experts import GroupedExperts
from ava.train.engine import precision
from ava.train.engine.fp8_cpu import use_cpu_matmuls
from ava.train.engine.precision import Fp8Matmul, apply_precision, torchao_config
from tests.conftest import REPO

torchao_float8 = pytest.importorskip("torchao.float8")
from torchao.float8.config import ScalingGranularity  # noqa: E402
from torchao.float8.float8_linear import Float8Linear  # noqa: E402

MOE = {"hidden_size": 64, "num_layers": 2, "num_attention_heads": 4, "intermediate_size": 128, "vocab_size": 64,
       "max_position_embeddings": 32, "num_experts": 4, "num_experts_per_token": 2, "expert_capacity_factor": None}


def _config(precision_name: str = "fp8", recipe: str = "tensorwise", margin: int = 0, backend: str = "torchao",
            **model: object) -> AvaConfig:
    return AvaConfig.model_validate({
        "model": {**MOE, **model}, "training": {"mixed_precision": precision_name},
        "deepspeed": {"fp8_recipe": recipe, "fp8_margin": margin, "fp8_backend": backend}})


def _model(config: AvaConfig) -> AvaForCausalLM:
    torch.manual_seed(0)
    return AvaForCausalLM(config.model)


def test_fp8_converts_attention_and_experts_and_keeps_router_gates_and_output_head():
    model = _model(_config())
    report = apply_precision(model, _config(), device="cpu")
    assert report.fp8_modules == [f"layers.{i}.{m}" for i in range(2) for m in (
        "attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "ffn.experts")]
    assert all(isinstance(model.get_submodule(n), Float8Linear) for n in report.fp8_modules if "attn" in n)
    assert all(model.get_submodule(f"layers.{i}.ffn.experts").fp8_matmul is not None for i in range(2))
    kept = {entry.split(" ")[0]: entry for entry in report.high_precision_modules}
    assert set(kept) == {"layers.0.ffn.router.gate", "layers.1.ffn.router.gate", "lm_head"}
    assert "router gate" in kept["layers.0.ffn.router.gate"] and "output head" in kept["lm_head"]
    for name in kept:
        assert type(model.get_submodule(name)) is nn.Linear
    assert report.as_dict() == {"precision": "fp8", "backend": "torchao", "recipe": "tensorwise", "emulated": True,
                                "fp8_modules": 10, "high_precision_modules": report.high_precision_modules,
                                "notes": report.notes}


def test_widths_not_multiples_of_16_stay_in_high_precision_with_the_reason():
    # Dense FFN 64 -> 72 -> 64 and 3 heads of 16 (q/k/v 64 -> 48): which matmuls can run in FP8 is per shape.
    config = _config(num_experts=0, intermediate_size=72, num_attention_heads=4, num_key_value_heads=2)
    model = _model(config)
    report = apply_precision(model, config, device="cpu")
    kept = {entry.split(" ")[0]: entry for entry in report.high_precision_modules}
    assert "layers.0.ffn.up_proj" in kept and "64x72" in kept["layers.0.ffn.up_proj"]
    assert "multiples of 16" in kept["layers.0.ffn.down_proj"]
    assert "layers.0.attn.k_proj" in report.fp8_modules  # 64 -> 2 heads x 16 = 32: aligned
    assert type(model.get_submodule("layers.0.ffn.up_proj")) is nn.Linear

    experts = _config(intermediate_size=40)
    model = _model(experts)
    report = apply_precision(model, experts, device="cpu")
    assert "layers.0.ffn.experts (experts 64x40: FP8 matmuls need multiples of 16)" in report.high_precision_modules
    assert model.get_submodule("layers.0.ffn.experts").fp8_matmul is None


def test_fp8_keeps_every_parameter_name_and_object():
    """Checkpoints, ZeRO partitioning and expert parallelism see the same parameters as without fp8."""
    model = _model(_config())
    before = dict(model.named_parameters())
    apply_precision(model, _config(), device="cpu")
    after = dict(model.named_parameters())
    assert list(after) == list(before)
    assert all(after[name] is before[name] for name in before)
    assert all(type(p) is nn.Parameter for p in after.values())


@pytest.mark.parametrize("name", ["fp32", "fp16", "bf16"])
def test_other_precisions_leave_the_model_untouched(name):
    config = _config(name)
    model = _model(config)
    reference = copy.deepcopy(model)
    report = apply_precision(model, config, device="cpu")
    assert report.as_dict() == {"precision": name, "backend": None, "recipe": None, "emulated": False,
                                "fp8_modules": 0, "high_precision_modules": [], "notes": []}
    assert [type(m) for m in model.modules()] == [type(m) for m in reference.modules()]
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values(),
                                                 strict=True))
    assert all(m.fp8_matmul is None for m in model.modules() if isinstance(m, GroupedExperts))


def test_tensorwise_and_rowwise_recipes_configure_different_scaling():
    scaling = {}
    for recipe in ("tensorwise", "rowwise"):
        config = _config(recipe=recipe)
        model = _model(config)
        assert apply_precision(model, config, device="cpu").recipe == recipe
        linear = model.get_submodule("layers.0.attn.q_proj").config
        experts = model.get_submodule("layers.0.ffn.experts").fp8_matmul.config
        assert experts == linear  # experts use the same recipe as the linears
        scaling[recipe] = (linear.cast_config_input.scaling_granularity,
                           linear.cast_config_weight.scaling_granularity, linear.round_scales_to_power_of_2)
    assert scaling["tensorwise"] == (ScalingGranularity.TENSORWISE, ScalingGranularity.TENSORWISE, False)
    assert scaling["rowwise"] == (ScalingGranularity.AXISWISE, ScalingGranularity.AXISWISE, True)


@pytest.mark.parametrize("cpu_matmuls", [False, True], ids=["scaled_mm", "cpu_matmuls"])
@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_expert_fp8_matmul_is_exactly_torchaos_float8_linear(recipe, cpu_matmuls):
    """An expert's (in, out) weight is Float8Linear's weight.t(): same FP8 casts, same result, bit for bit.

    Also with the CPU kernel (`fp8_cpu`), which the experts and the converted linears share on a CPU.
    """
    torch.manual_seed(0)
    config = torchao_config(recipe)
    x = torch.randn(24, 64, dtype=torch.bfloat16)
    w = torch.randn(64, 32, dtype=torch.bfloat16)
    linear = nn.Linear(64, 32, bias=False, dtype=torch.bfloat16)
    with torch.no_grad():
        linear.weight.copy_(w.t())
    layer = Float8Linear.from_float(linear, config=config)
    if cpu_matmuls:
        use_cpu_matmuls(layer)
    assert torch.equal(Fp8Matmul(config, cpu_matmuls=cpu_matmuls)(x, w), layer(x))


def _experts(dtype: torch.dtype) -> GroupedExperts:
    torch.manual_seed(0)
    experts = GroupedExperts(4, 64, 128, "swiglu")
    for p in experts.parameters():
        nn.init.normal_(p, std=0.1)
    return experts.to(dtype)


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_experts_run_fp8_close_to_bf16_forward_and_backward_with_an_idle_expert(recipe):
    reference, fp8 = _experts(torch.bfloat16), _experts(torch.bfloat16)
    fp8.use_fp8(Fp8Matmul(torchao_config(recipe)))
    counts = torch.tensor([20, 0, 7, 13])  # expert 1 receives no rows
    rows = torch.randn(40, 64, dtype=torch.bfloat16)
    outputs, grads = [], []
    for experts in (reference, fp8):
        x = rows.clone().requires_grad_()
        out = experts(x, counts)
        out.float().pow(2).sum().backward()
        outputs.append(out.detach().float())
        grads.append([x.grad.float(), *(p.grad.float() for p in experts.parameters())])

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).norm() / b.norm())

    # e4m3 keeps 3 mantissa bits: a few percent per matmul, far from the 100% of a wrong result.
    assert 1e-3 < rel(outputs[1], outputs[0]) < 0.1  # quantised (not bf16 itself) and close
    for got, expected in zip(grads[1], grads[0], strict=True):
        assert rel(got, expected) < 0.15
    for p in fp8.parameters():  # the idle expert is in the graph, with a zero gradient
        assert p.grad is not None and not p.grad[1].any()


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_fp8_model_loss_and_gradients_track_bf16(recipe):
    config = _config(recipe=recipe)
    reference, model = _model(config).to(torch.bfloat16), _model(config)
    report = apply_precision(model, config, device="cpu")
    model = model.to(torch.bfloat16)  # what DeepSpeed's bf16 does next
    ids = torch.randint(0, 64, (4, 32), generator=torch.Generator().manual_seed(1))
    losses = []
    for m in (reference, model):
        with report.autocast():
            loss = m(ids, labels=ids).loss
        loss.backward()
        losses.append(float(loss.detach()))
    assert losses[1] != losses[0]
    assert abs(losses[1] - losses[0]) / losses[0] < 0.01
    grad = model.get_submodule("layers.0.ffn.experts").up_proj.grad
    expected = reference.get_submodule("layers.0.ffn.experts").up_proj.grad
    assert float((grad.float() - expected.float()).norm() / expected.float().norm()) < 0.2


def test_cpu_fp8_is_reported_as_emulated_with_one_note():
    report = apply_precision(_model(_config()), _config(), device="cpu")
    assert report.emulated
    emulated = [n for n in report.notes if "emulated" in n]
    assert emulated == ["fp8: CPU has no FP8 matrix units; FP8 matmuls are emulated with a bf16 matmul of the FP8 "
                        "values (same casts and scales, slower than bf16)"]
    assert not any("fp8_margin" in n for n in report.notes)


def test_a_margin_with_torchao_gets_a_note_that_it_has_no_effect():
    report = apply_precision(_model(_config()), _config(margin=2), device="cpu")
    (note,) = [n for n in report.notes if "fp8_margin" in n]
    assert "deepspeed.fp8_margin = 2 has no effect with fp8_backend torchao" in note


def test_transformer_engine_without_a_gpu_is_a_config_error_naming_the_key_and_the_fix():
    with pytest.raises(ConfigError) as info:
        apply_precision(_model(_config()), _config(backend="transformer_engine"), device="cpu")
    (problem,) = info.value.problems
    assert problem.key == "deepspeed.fp8_backend" and problem.value == "transformer_engine"
    text = info.value.render()
    assert "NVIDIA GPU" in text and "this run's device is cpu" in text
    assert "install transformer-engine" in text and "fp8_backend: torchao" in text


def test_transformer_engine_not_installed_is_a_config_error(monkeypatch):
    if importlib.util.find_spec("transformer_engine") is not None:
        pytest.skip("transformer_engine is installed here")
    monkeypatch.setattr(precision, "_describe_device", lambda device: ("cuda", "a GPU", True))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ConfigError, match="deepspeed.fp8_backend") as info:
        apply_precision(_model(_config()), _config(backend="transformer_engine"), device="cuda")
    assert "transformer_engine package, which is not installed" in info.value.render()


def test_torchao_is_imported_only_for_fp8_and_without_its_import_noise():
    """A bf16 run never imports torchao; an fp8 run does, without the lines about optional CUDA kernels."""
    code = f"""
import sys
from ava.config.schema import AvaConfig
from ava.model import AvaForCausalLM
from ava.train.engine.precision import apply_precision
config = AvaConfig.model_validate({{"model": {MOE!r}, "training": {{"mixed_precision": "bf16"}}}})
apply_precision(AvaForCausalLM(config.model), config, device="cpu")
assert "torchao" not in sys.modules, "bf16 imported torchao"
config = AvaConfig.model_validate({{"model": {MOE!r}, "training": {{"mixed_precision": "fp8"}}}})
report = apply_precision(AvaForCausalLM(config.model), config, device="cpu")
assert "torchao" in sys.modules and report.fp8_modules
"""
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Failed to load" not in result.stderr and "Enum subclass" not in result.stderr, result.stderr


def test_fp16_on_a_machine_without_it_is_a_user_error_before_deepspeed_refuses_it(monkeypatch):
    """Without a hardware config saying fp16: false, DeepSpeed's sanity check raised a bare ValueError traceback."""
    import deepspeed.accelerator as accelerators

    from ava.errors import UserError
    from ava.train.engine.build import refuse_unsupported_fp16

    class NoFp16:
        def is_fp16_supported(self) -> bool:
            return False

    monkeypatch.setattr(accelerators, "get_accelerator", lambda: NoFp16())
    with pytest.raises(UserError) as err:
        refuse_unsupported_fp16({"fp16": {"enabled": True}})
    assert "NoFp16 has no fp16 support" in err.value.message and "bf16" in err.value.fix
    refuse_unsupported_fp16({"bf16": {"enabled": True}})  # other precisions are not asked about
