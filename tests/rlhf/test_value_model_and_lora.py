"""Value models (reward model, critic), policy/reward directories, dropout control, and LoRA adapters."""

from __future__ import annotations

import peft  # noqa: F401  # imported at collection: its one-off import (seconds) is no test's cost
import pytest
import torch
from torch import nn

from ava.config.schema.model import ModelConfig
from ava.errors import UserError
from ava.model import AvaForCausalLM
from ava.model.attention import CausalSelfAttention
from ava.model.lora import adapter_state, apply_lora, merge_lora_state, parameter_report
from ava.model.store import save_model_dir
from ava.rlhf.models import (
    VALUE_HEAD_FILE,
    disable_dropout,
    load_policy,
    load_value_model,
    model_dir,
    save_policy,
    save_value_model,
    value_model_from_policy,
)

VOCAB = 61


def _config(**overrides) -> ModelConfig:
    base = dict(hidden_size=32, num_layers=2, num_attention_heads=4, intermediate_size=48, vocab_size=VOCAB,
                max_position_embeddings=32, num_experts=0)
    return ModelConfig(**{**base, **overrides})


def _model(seed: int = 0, **overrides) -> AvaForCausalLM:
    torch.manual_seed(seed)
    return AvaForCausalLM(_config(**overrides)).eval()


def _ids(batch: int = 2, seq: int = 10) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(1))


# --- value models -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("experts", [0, 4], ids=["dense", "moe"])
def test_a_value_model_from_a_policy_reads_the_policys_hidden_states(experts):
    policy = _model(num_experts=experts, expert_capacity_factor=0)
    value = value_model_from_policy(policy, head_std=0.1).eval()
    ids = _ids()
    with torch.no_grad():
        expected, _, _ = policy.hidden_states(ids)
        hidden, _, _ = value.trunk.hidden_states(ids)
        values = value(ids).values
        head = value.value_head(expected).squeeze(-1)
    torch.testing.assert_close(hidden, expected, rtol=0, atol=0)
    torch.testing.assert_close(values, head, rtol=1e-6, atol=1e-6)
    assert values.shape == ids.shape and values.abs().max() > 0


def test_a_value_head_with_zero_std_starts_every_value_at_zero():
    value = value_model_from_policy(_model(), head_std=0.0)
    with torch.no_grad():
        assert torch.equal(value(_ids()).values, torch.zeros(2, 10))


def test_a_value_model_has_no_output_head():
    value = value_model_from_policy(_model(), head_std=0.0)
    assert not hasattr(value.trunk, "lm_head")
    assert not [k for k in value.state_dict() if "lm_head" in k]


def test_a_saved_value_model_loads_with_the_same_values(tmp_path):
    value = value_model_from_policy(_model(), head_std=0.3).eval()
    save_value_model(value.state_dict(), value.config, tmp_path / "reward" / "model")
    assert (tmp_path / "reward" / "model" / VALUE_HEAD_FILE).is_file()
    loaded = load_value_model(tmp_path / "reward", "rlhf.reward_model_path").eval()  # a stage directory works
    with torch.no_grad():
        torch.testing.assert_close(loaded(_ids()).values, value(_ids()).values, rtol=0, atol=0)


def test_load_policy_refuses_a_reward_model_by_name(tmp_path):
    value = value_model_from_policy(_model())
    save_value_model(value.state_dict(), value.config, tmp_path)
    with pytest.raises(UserError, match="rlhf.policy_path: .* holds a reward model"):
        load_policy(tmp_path, "rlhf.policy_path")


def test_load_value_model_refuses_a_policy_directory(tmp_path):
    save_model_dir(_model(), tmp_path)
    with pytest.raises(UserError, match=f"rlhf.reward_model_path: .* has no {VALUE_HEAD_FILE}, so it is not a "
                                              "reward model"):
        load_value_model(tmp_path, "rlhf.reward_model_path")


def test_model_dir_accepts_a_run_directory_and_names_the_setting_for_a_missing_path(tmp_path):
    save_model_dir(_model(), tmp_path / "run" / "model")
    assert model_dir(tmp_path / "run", "rlhf.policy_path") == tmp_path / "run" / "model"
    assert model_dir(tmp_path / "run" / "model", "rlhf.policy_path") == tmp_path / "run" / "model"
    with pytest.raises(UserError, match="rlhf.policy_path: .*nowhere does not exist"):
        model_dir(tmp_path / "nowhere", "rlhf.policy_path")
    with pytest.raises(UserError, match="rlhf.policy_path: .* is not an Ava model directory"):
        model_dir(tmp_path, "rlhf.policy_path")  # exists, but holds neither ava_model.yaml nor model/


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_save_policy_from_a_full_state_dict_loads_with_identical_logits(tmp_path, tied):
    policy = _model(seed=3, tie_word_embeddings=tied)
    save_policy(policy.state_dict(), policy.config, tmp_path)
    torch.manual_seed(99)  # the loaded model starts from other random weights: only loading can make them agree
    loaded = load_policy(tmp_path, "rlhf.policy_path").eval()
    assert loaded.config.tie_word_embeddings is tied
    if tied:
        assert loaded.lm_head.weight is loaded.embed_tokens.weight
    with torch.no_grad():
        torch.testing.assert_close(loaded(_ids()).logits, policy(_ids()).logits, rtol=0, atol=0)


# --- dropout ----------------------------------------------------------------------------------------------------


def test_disable_dropout_zeroes_module_and_attention_dropout_and_counts_them():
    model = _model(hidden_dropout=0.1, attention_dropout=0.2)
    # The embedding dropout and one per block (hidden), one per attention layer (attention).
    assert disable_dropout(model) == 1 + 2 + 2
    assert all(m.p == 0.0 for m in model.modules() if isinstance(m, nn.Dropout))
    assert all(m.dropout == 0.0 for m in model.modules() if isinstance(m, CausalSelfAttention))
    model.train()
    with torch.no_grad():  # training mode now computes one function: rollout and update agree
        torch.testing.assert_close(model(_ids()).logits, model(_ids()).logits, rtol=0, atol=0)
    assert disable_dropout(model) == 0


def test_disable_dropout_reaches_every_attention_kind_not_only_standard_attention():
    model = _model(num_layers=4, num_attention_heads=4, attention_dropout=0.2, use_moh=True, use_moa=True,
                   moa={"every_n_layers": 2, "num_experts": 2}, use_episodic_memory=True,
                   episodic_memory={"layer": 3, "segment_length": 4, "memory_size": 8, "top_k": 2})
    kinds = {type(block.attn).__name__ for block in model.layers}
    assert {"MixtureOfHeadsAttention", "MixtureOfAttention", "EpisodicMemoryAttention"} <= kinds
    disable_dropout(model)
    assert all(block.attn.dropout == 0.0 for block in model.layers)
    model.train()
    with torch.no_grad():  # MoA's and the memory's SDPA dropout too: training mode computes one function
        torch.testing.assert_close(model(_ids()).logits, model(_ids()).logits, rtol=0, atol=0)


# --- LoRA -------------------------------------------------------------------------------------------------------

TARGETS = ["q_proj", "v_proj"]


def test_lora_at_init_leaves_the_outputs_unchanged():
    model = _model()
    with torch.no_grad():
        before = model(_ids()).logits
    apply_lora(model, rank=4, alpha=8.0, dropout=0.0, target_modules=TARGETS)
    with torch.no_grad():
        torch.testing.assert_close(model(_ids()).logits, before, rtol=0, atol=0)


def test_lora_trains_only_the_adapters_and_reports_the_counts():
    model = _model()
    base_total = sum(p.numel() for p in model.parameters())
    rank = 4
    scaling = apply_lora(model, rank=rank, alpha=8.0, dropout=0.0, target_modules=TARGETS)
    assert scaling == 2.0
    for name, param in model.named_parameters():
        assert param.requires_grad == ("lora_" in name), name
    # q_proj and v_proj are 32 -> 32 here: A is (r, 32) and B (32, r), in each of the 2 layers.
    lora = 2 * len(TARGETS) * (rank * 32 + 32 * rank)
    report = parameter_report(model)
    assert (report.total, report.trainable, report.lora) == (base_total + lora, lora, lora)
    assert report.trainable_percent == pytest.approx(100 * lora / (base_total + lora))
    assert report.trainable_percent < 50


@pytest.mark.parametrize("overrides,targets", [
    ({}, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]),
    (dict(use_bias=True, activation="gelu_tanh", norm_type="layernorm", position_embedding_type="learned"),
     ["q_proj", "o_proj", "up_proj", "down_proj"]),  # GPT-2 shaped: adapted layers carry biases
], ids=["llama", "gpt2_bias"])
def test_merged_lora_weights_load_into_a_plain_model_with_the_same_logits(tmp_path, overrides, targets):
    model = _model(**overrides)
    with torch.no_grad():
        base = model(_ids()).logits
    scaling = apply_lora(model, rank=4, alpha=12.0, dropout=0.0, target_modules=targets)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.2)
        adapted = model(_ids()).logits
    assert not torch.allclose(adapted, base, atol=1e-3)  # the adapters now change the outputs
    merged = merge_lora_state(model.state_dict(), scaling)
    assert not [k for k in merged if "lora_" in k or "base_layer" in k]
    torch.manual_seed(123)
    plain = AvaForCausalLM(model.config).eval()
    plain.load_state_dict(merged, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(plain(_ids()).logits, adapted, rtol=1e-5, atol=1e-5)
    save_policy(merged, model.config, tmp_path)  # what a LoRA stage writes loads like any policy
    with torch.no_grad():
        reloaded = load_policy(tmp_path, "rlhf.policy_path").eval()(_ids()).logits
    torch.testing.assert_close(reloaded, adapted, rtol=1e-5, atol=1e-5)


def test_adapter_state_keeps_only_the_adapter_tensors():
    model = _model()
    apply_lora(model, rank=4, alpha=8.0, dropout=0.0, target_modules=TARGETS)
    state = model.state_dict()
    adapter = adapter_state(state)
    assert set(adapter) == {k for k in state if ".lora_A." in k or ".lora_B." in k}
    assert len(adapter) == 2 * len(TARGETS) * 2  # A and B, per target, per layer
    assert all(adapter[k] is state[k] for k in adapter)


def test_a_target_module_that_does_not_exist_is_a_model_input_error():
    with pytest.raises(UserError, match=r"LoRA target modules \['qkv_proj'\] do not match the model") as err:
        apply_lora(_model(), rank=4, alpha=8.0, dropout=0.0, target_modules=["qkv_proj"])
    assert "target_modules" in err.value.fix


def test_lora_dropout_reaches_the_adapters():
    model = _model()
    apply_lora(model, rank=4, alpha=8.0, dropout=0.3, target_modules=TARGETS)
    dropouts = [m for name, m in model.named_modules() if name.endswith("lora_dropout.default")]
    assert len(dropouts) == 2 * len(TARGETS)
    assert all(isinstance(m, nn.Dropout) and m.p == 0.3 for m in dropouts)


def test_the_lora_base_comes_from_the_plain_models_weights_under_the_wrapped_names():
    from ava.model.lora import lora_base_state

    plain = _model()
    wrapped = _model()
    apply_lora(wrapped, rank=4, alpha=8.0, dropout=0.0, target_modules=TARGETS)
    base = lora_base_state(wrapped.state_dict(), plain.state_dict())
    assert set(base) == {k for k in wrapped.state_dict() if ".lora_" not in k}
    for key, value in base.items():
        assert torch.equal(value, plain.state_dict()[key.replace(".base_layer.", ".")])
