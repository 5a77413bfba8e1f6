"""training.lora: what trains, what the report says, and the two misconfigurations that warn."""

from __future__ import annotations

import pytest
import torch

from ava.config.schema.lora import TrainingLoRAConfig
from ava.config.schema.model import ModelConfig
from ava.model import AvaForCausalLM
from ava.model.lora import apply_training_lora, lora_warnings, parameter_report

SMALL = ModelConfig(hidden_size=64, num_layers=3, num_attention_heads=4, intermediate_size=128, vocab_size=64,
                    max_position_embeddings=32, num_experts=0)


def _lora_model(**switches: bool) -> tuple[AvaForCausalLM, TrainingLoRAConfig]:
    torch.manual_seed(0)
    model = AvaForCausalLM(SMALL)
    lora = TrainingLoRAConfig(enabled=True, rank=4, alpha=8, **switches)
    apply_training_lora(model, lora)
    return model, lora


def test_only_adapters_and_the_chosen_head_change_in_training() -> None:
    model, _ = _lora_model(train_head=True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    tokens = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        model(tokens, labels=tokens).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    assert changed == {n for n in before if ".lora_" in n or n.startswith(("lm_head.", "norm."))}
    assert any("lora_B" in n for n in changed)


def test_report_counts_adapters_and_trainable_share() -> None:
    model, _ = _lora_model()
    report = parameter_report(model)
    adapters = 3 * 4 * (4 * (64 + 64))  # layers x projections x rank x (in + out)
    assert report.lora == adapters and report.trainable == adapters
    assert report.trainable_percent == pytest.approx(100 * adapters / report.total)
    assert f"{report.trainable_percent:.2f}%" in report.line() and "frozen" in report.line()


def test_frozen_embeddings_and_head_from_scratch_warn_and_fine_tuning_does_not() -> None:
    model, lora = _lora_model()
    report = parameter_report(model)
    [warning] = lora_warnings(report, lora, from_scratch=True)
    assert "train_embeddings: true" in warning and "train_head: true" in warning
    assert lora_warnings(report, lora, from_scratch=False) == []


def test_more_than_half_trainable_under_lora_warns() -> None:
    model, lora = _lora_model(freeze_base=False)
    report = parameter_report(model)
    assert report.trainable == report.total
    warnings = lora_warnings(report, lora, from_scratch=False)
    assert len(warnings) == 1 and "100.0% of the parameters are trainable" in warnings[0]
    assert "freeze_base" in warnings[0]


@pytest.mark.parametrize("switch", ["train_head", "train_embeddings"])
def test_tied_head_and_embedding_train_together_and_do_not_warn_as_frozen(switch: str) -> None:
    from ava.model.lora import prepare_trainable

    torch.manual_seed(0)
    model = AvaForCausalLM(SMALL.model_copy(update={"tie_word_embeddings": True}))
    lora = TrainingLoRAConfig(enabled=True, rank=4, alpha=8, **{switch: True})
    _, _, warnings = prepare_trainable(model, lora, from_scratch=True)
    assert model.embed_tokens.weight.requires_grad  # the one matrix both roles share
    assert warnings == []
    untied = AvaForCausalLM(SMALL)
    _, _, warnings = prepare_trainable(untied, lora, from_scratch=True)
    assert len(warnings) == 1 and "frozen" in warnings[0]  # the other role really is frozen when untied


def test_what_the_enhanced_features_add_keeps_training_under_lora():
    cfg = ModelConfig(hidden_size=32, num_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=64,
                      max_position_embeddings=32, num_experts=0, use_cross_attention=True, use_rag=True,
                      use_moh=True, moh={"num_shared_heads": 1, "active_routed_heads": 2})
    model = AvaForCausalLM(cfg)
    apply_training_lora(model, TrainingLoRAConfig(enabled=True, target_modules=["q_proj", "v_proj"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"cross_blocks.0.attn_gate", "cross_blocks.0.ffn_gate", "layers.0.attn.router.routed_gate.weight"} \
        <= trainable  # closed gates must open, or the adapters inside the blocks never get a gradient
    assert "layers.0.attn.k_proj.weight" not in trainable and "embed_tokens.weight" not in trainable
    assert any(".lora_" in n for n in trainable)
