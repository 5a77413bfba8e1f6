"""The whole model: shapes, limits, attention variants, checkpointing, caching, sampling, accounting."""

from __future__ import annotations

import pytest
import torch

from ava.config.schema.model import ModelConfig
from ava.errors import UserError
from ava.model import AvaForCausalLM
from ava.model.generate import filter_logits
from ava.model.mlp import DenseMLP
from ava.model.moe import MoELayer, summarise_moe_stats
from ava.model.summary import summarise_config, summarise_model


def _cfg(**overrides) -> ModelConfig:
    base = dict(hidden_size=32, num_layers=2, num_attention_heads=4, intermediate_size=48, vocab_size=61,
                max_position_embeddings=32, num_experts=4, num_experts_per_token=2)
    return ModelConfig(**{**base, **overrides})


def _model(**overrides) -> AvaForCausalLM:
    torch.manual_seed(0)
    return AvaForCausalLM(_cfg(**overrides))


def _ids(batch: int = 2, seq: int = 12) -> torch.Tensor:
    return torch.randint(0, 61, (batch, seq), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("experts", [0, 1])
def test_zero_or_one_expert_builds_a_dense_monolith(experts):
    model = _model(num_experts=experts)
    assert all(isinstance(b.ffn, DenseMLP) for b in model.layers)
    out = model(_ids(), labels=_ids())
    assert out.moe_stats == [] and out.router_loss is None and torch.equal(out.loss, out.lm_loss)


def test_moe_model_adds_router_loss_to_lm_loss_and_reports_stats_per_layer():
    model = _model()
    out = model(_ids(), labels=_ids())
    assert all(isinstance(b.ffn, MoELayer) for b in model.layers)
    torch.testing.assert_close(out.loss, out.lm_loss + out.router_loss)
    summary = summarise_moe_stats(out.moe_stats)
    assert {"moe/layer0/load_cv", "moe/layer1/router_entropy", "moe/dropped_fraction",
            "moe/layer1/load/expert3"} <= set(summary)


def test_loss_is_next_token_cross_entropy_ignoring_minus_100():
    model = _model(num_experts=0)
    ids = _ids()
    labels = ids.clone()
    labels[:, :5] = -100
    out = model(ids, labels=labels)
    logits = out.logits[:, :-1].reshape(-1, 61)
    expected = torch.nn.functional.cross_entropy(logits, labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.lm_loss, expected)


def test_sequence_longer_than_max_positions_is_a_clear_error():
    model = _model()
    with pytest.raises(UserError, match="max_position_embeddings = 32") as err:
        model(torch.zeros(1, 33, dtype=torch.long))
    assert "data.max_length" in err.value.fix


def test_model_is_causal_future_tokens_do_not_change_past_logits():
    model = _model(position_embedding_type="learned", norm_type="layernorm", activation="gelu", use_bias=True).eval()
    a, b = _ids(1, 12), _ids(1, 12).clone()
    b[0, 8:] = (b[0, 8:] + 1) % 61
    torch.testing.assert_close(model(a).logits[:, :8], model(b).logits[:, :8])


def test_grouped_query_attention_shares_kv_heads():
    model = _model(num_key_value_heads=1)
    attn = model.layers[0].attn
    assert attn.q_proj.out_features == 4 * 8 and attn.k_proj.out_features == attn.v_proj.out_features == 8
    assert model(_ids()).logits.shape == (2, 12, 61)


def test_tied_embeddings_share_one_tensor():
    model = _model(tie_word_embeddings=True)
    assert model.lm_head.weight is model.embed_tokens.weight
    assert summarise_model(model, 12).total == sum(p.numel() for p in model.parameters())


def test_gradient_checkpointing_gives_identical_loss_and_gradients():
    ids = _ids()
    results = []
    for ckpt in (False, True):
        model = _model()
        model.gradient_checkpointing = ckpt
        model.train()
        out = model(ids, labels=ids)
        out.loss.backward()
        results.append((out.loss.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0])
    for g0, g1 in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(g0, g1)


def test_dropout_is_active_in_training_and_off_in_eval():
    model = _model(hidden_dropout=0.5, attention_dropout=0.5)
    ids = _ids()
    model.train()
    assert not torch.equal(model(ids).logits, model(ids).logits)
    model.eval()
    assert torch.equal(model(ids).logits, model(ids).logits)


@pytest.mark.parametrize("positions", ["rope", "learned"])
def test_kv_cache_logits_equal_full_recomputation(positions):
    model = _model(position_embedding_type=positions, num_key_value_heads=2).eval()
    ids = _ids(2, 16)
    full = model(ids).logits
    cache = model.new_cache(2, 16)
    chunks = [model(ids[:, :7], cache=cache).logits, model(ids[:, 7:10], cache=cache).logits]
    chunks += [model(ids[:, i:i + 1], cache=cache).logits for i in range(10, 16)]
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, atol=1e-5, rtol=1e-5)


def test_greedy_generation_with_cache_equals_argmax_without_cache():
    model = _model().eval()
    prompt = _ids(2, 5)
    got = model.generate(prompt, 8, temperature=0)
    tokens = prompt
    for _ in range(8):
        tokens = torch.cat([tokens, model(tokens).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(got, tokens)


def test_sampling_is_reproducible_with_a_generator_and_stops_at_eos():
    model = _model().eval()
    prompt = _ids(2, 4)
    a = model.generate(prompt, 10, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(7))
    b = model.generate(prompt, 10, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    eos = int(a[0, 4])
    c = model.generate(prompt, 10, temperature=1.0, top_k=5, eos_token_id=eos,
                       generator=torch.Generator().manual_seed(7))
    assert c[0, 4] == eos and bool((c[0, 4:] == eos).all())


def test_generation_past_max_positions_is_refused_before_any_work():
    with pytest.raises(UserError, match="at most 27 new tokens"):
        _model().generate(_ids(1, 5), 40)


def test_top_k_and_top_p_filters_keep_the_right_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    assert torch.isfinite(filter_logits(logits, 2, None)).tolist() == [[True, True, False, False, False]]
    # top_p 0.8: 0.5 + 0.2 = 0.7 < 0.8, so the 0.15 token is still needed; the rest go.
    assert torch.isfinite(filter_logits(logits, None, 0.8)).tolist() == [[True, True, True, False, False]]
    assert torch.isfinite(filter_logits(logits, None, 0.01)).tolist() == [[True, False, False, False, False]]


def test_summary_counts_total_active_and_components():
    cfg = _cfg()
    s = summarise_config(cfg, 16)
    model = AvaForCausalLM(cfg)
    assert s.total == sum(p.numel() for p in model.parameters())
    expert_params = 2 * 4 * (32 * 96 + 48 * 32)  # layers * experts * (gate_up + down)
    assert s.components["experts"] == expert_params
    assert s.active_per_token == s.total - expert_params // 2  # top-2 of 4: half the experts idle
    matmul = s.active_per_token - s.components["token embedding"] - s.components["norms"]
    assert s.forward_flops_per_token == 2 * matmul + 2 * 2 * 2 * 16 * 32
    assert s.training_flops_per_token == 3 * s.forward_flops_per_token


def test_initialisation_uses_initializer_range_and_scales_residual_projections():
    model = _model(initializer_range=0.05, num_layers=8, num_experts=0, hidden_size=128, intermediate_size=256)
    assert abs(model.embed_tokens.weight.std().item() - 0.05) < 0.005
    assert abs(model.layers[0].attn.o_proj.weight.std().item() - 0.05 / 4) < 0.002


def test_balance_router_biases_uses_each_layers_summed_load():
    from ava.train.engine.router_balance import balance_router_biases

    model = _model(router_type="aux_loss_free", router_bias_update_rate=0.1)
    out = model(_ids())
    loads = [s.load for s in out.moe_stats]
    balance_router_biases(model, loads, 0.1)
    for layer, load in zip(model.moe_layers(), loads, strict=True):
        expected = 0.1 * torch.sign(load.float().mean() - load.float())
        torch.testing.assert_close(layer.router.expert_bias, expected)
    assert "layers.0.ffn.router.expert_bias" in model.state_dict()  # a resumed run continues from it
