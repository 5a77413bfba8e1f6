"""All five enhanced features in one model: decoding, losses, statistics, accounting."""

from __future__ import annotations

import torch

from ava.config.schema.model import ModelConfig
from ava.model.attention_interface import AttentionInputs
from ava.model.moe import summarise_moe_stats
from ava.model.summary import summarise_model
from ava.model.transformer import AvaForCausalLM, Context

ALL_ON = dict(hidden_size=64, num_layers=4, num_attention_heads=4, intermediate_size=128, vocab_size=100,
              max_position_embeddings=64, num_experts=4, use_moh=True,
              moh={"num_shared_heads": 1, "active_routed_heads": 2}, use_moa=True,
              moa={"every_n_layers": 2, "num_experts": 4}, use_cross_attention=True, use_rag=True,
              use_episodic_memory=True, episodic_memory={"segment_length": 8, "top_k": 4}, rag={"chunk_size": 8})


def _model() -> AvaForCausalLM:
    torch.manual_seed(0)
    model = AvaForCausalLM(ModelConfig(**ALL_ON)).double().eval()
    with torch.no_grad():  # open every gate, so each feature changes the output
        for name, p in model.named_parameters():
            if name.endswith(("attn_gate", "ffn_gate", "memory_gate")):
                p.fill_(0.7)
    return model


def test_layers_get_the_attention_their_feature_assigns():
    model = _model()
    assert [b.attn_kind for b in model.layers] == ["moh", "moa", "moh", "memory"]
    assert list(model.cross_blocks) == ["0"]


def test_cached_decoding_with_every_feature_on_matches_the_full_forward():
    model = _model()
    ids = torch.randint(0, 100, (2, 24))
    context = Context(neighbours=torch.randint(-1, 100, (2, 3, 2, 16)))
    full = model(ids, context=context).logits
    cache = model.new_cache(2, 24)
    steps = [model(ids[:, :10], cache=cache, context=context).logits]
    steps += [model(ids[:, t:t + 1], cache=cache, context=context).logits for t in range(10, 24)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=0, atol=1e-10)


def test_router_loss_sums_the_expert_and_attention_routers_and_stats_are_logged_by_kind():
    model = _model()
    ids = torch.randint(0, 100, (2, 16))
    out = model(ids, labels=ids, context=Context(neighbours=torch.randint(0, 100, (2, 2, 2, 16))))
    assert [s.kind for s in out.attention_stats] == ["moh", "moa", "moh"] and len(out.moe_stats) == 4
    expected = sum(s.router_loss for s in (*out.moe_stats, *out.attention_stats))
    torch.testing.assert_close(out.router_loss, expected)
    logged = summarise_moe_stats([*out.moe_stats, *out.attention_stats])
    assert {"moe/aux_loss", "moh/aux_loss", "moa/aux_loss", "moh/layer1/load/head1", "moa/layer0/load/expert3"} \
        <= logged.keys()


def test_documents_clear_the_memory_in_a_packed_row():
    model = _model()
    ids = torch.randint(0, 100, (1, 32))
    documents = torch.tensor([[0] * 20 + [1] * 12])
    changed = ids.clone()
    changed[0, :16] = (changed[0, :16] + 1) % 100  # rewrite most of document 0
    a = model(ids, context=Context(documents=documents)).logits
    b = model(changed, context=Context(documents=documents)).logits
    # Document 1's tokens still see document 0 through ordinary causal attention in the other layers, so
    # compare against a model whose only cross-document path is cut: the memory layer alone must not leak.
    memory = model.layers[3].attn
    x = torch.randn(1, 32, 64, dtype=torch.float64)
    y = x.clone()
    y[0, :16] += 1.0
    out_x = memory(x, None, inputs=AttentionInputs(documents=documents))[0]
    out_y = memory(y, None, inputs=AttentionInputs(documents=documents))[0]
    torch.testing.assert_close(out_x[0, 20:], out_y[0, 20:], rtol=0, atol=0)
    assert not torch.equal(a, b)


def test_summary_counts_inactive_attention_experts_and_describes_each_feature():
    model = _model()
    s = summarise_model(model, 32)
    moa = model.layers[1].attn
    routed = moa.q_proj.numel() + moa.o_proj.numel()
    experts = sum(p.numel() for layer in model.moe_layers() for p in layer.experts.parameters())
    assert s.total - s.active_per_token == experts // 2 + routed // 2
    assert set(s.features) == {"moh", "moa", "episodic_memory", "cross_attention", "rag"}
    assert s.components["cross-attention"] == sum(p.numel() for p in model.cross_blocks.parameters())


# Every parameter name and shape of the ALL_ON model: checkpoints and the Hugging Face export map these names
# exactly, so a refactor of the attention layers must leave them as they are.
ALL_ON_STATE = {
    "embed_tokens.weight": (100, 64),
    **{f"layers.{i}.attn.{p}_proj.weight": (64, 64) for i in (0, 2, 3) for p in "qkvo"},
    **{f"layers.{i}.attn.router.{gate}.weight": shape for i in (0, 2)
       for gate, shape in (("shared_gate", (1, 64)), ("routed_gate", (3, 64)), ("group_gate", (2, 64)))},
    "layers.1.attn.q_proj": (4, 64, 64), "layers.1.attn.o_proj": (4, 64, 64),
    "layers.1.attn.router.gate.weight": (4, 64),
    "layers.1.attn.k_proj.weight": (64, 64), "layers.1.attn.v_proj.weight": (64, 64),
    "layers.3.attn.memory_gate": (4,),
    **{f"layers.{i}.{norm}.weight": (64,) for i in range(4) for norm in ("attn_norm", "ffn_norm")},
    **{f"layers.{i}.ffn.{name}": shape for i in range(4)
       for name, shape in (("router.gate.weight", (4, 64)), ("experts.gate_proj", (4, 64, 128)),
                           ("experts.up_proj", (4, 64, 128)), ("experts.down_proj", (4, 128, 64)))},
    "cross_blocks.0.attn_gate": (1,), "cross_blocks.0.ffn_gate": (1,),
    "cross_blocks.0.attn_norm.weight": (64,), "cross_blocks.0.ffn_norm.weight": (64,),
    **{f"cross_blocks.0.{p}_proj.weight": (64, 64) for p in "qkvo"},
    "cross_blocks.0.ffn.gate_proj.weight": (128, 64), "cross_blocks.0.ffn.up_proj.weight": (128, 64),
    "cross_blocks.0.ffn.down_proj.weight": (64, 128),
    "norm.weight": (64,),
    "lm_head.weight": (100, 64),
}


def test_state_dict_names_and_shapes_of_all_five_features_are_the_pinned_ones():
    state = AvaForCausalLM(ModelConfig(**ALL_ON)).state_dict()
    assert {name: tuple(t.shape) for name, t in state.items()} == ALL_ON_STATE
