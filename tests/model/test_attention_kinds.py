"""Attention kinds by name: every kind answers one call, and a new kind needs an entry in the table, nothing else."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ava.config.schema.model import ModelConfig
from ava.model.attention_interface import AttentionInputs
from ava.model.attention_kinds import ATTENTION_KINDS, make_attention
from ava.model.kv_cache import KVCache
from ava.model.moe import MoEStats
from ava.model.rotary import RotaryEmbedding
from ava.model.transformer import AvaForCausalLM, Context

ALL_ON = dict(hidden_size=32, num_layers=4, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
              vocab_size=64, max_position_embeddings=32, num_experts=1, use_moh=True,
              moh={"num_shared_heads": 1, "active_routed_heads": 2}, use_moa=True,
              moa={"every_n_layers": 2, "num_experts": 4}, use_cross_attention=True, use_episodic_memory=True,
              episodic_memory={"segment_length": 4, "memory_size": 8, "top_k": 2})
SMALL = dict(hidden_size=32, num_layers=3, num_attention_heads=4, intermediate_size=64, vocab_size=64,
             max_position_embeddings=32, num_experts=1)


@pytest.mark.parametrize("kind", sorted(ATTENTION_KINDS))
def test_every_registered_kind_answers_the_one_call_and_decodes_from_a_cache_what_it_computes_whole(kind):
    cfg = ModelConfig(**ALL_ON)
    torch.manual_seed(0)
    attn = make_attention(kind, cfg, 1).double().eval()
    with torch.no_grad():  # open the gates, so that each kind's own path shapes the output
        for name, p in attn.named_parameters():
            if name.endswith("gate"):
                p.fill_(0.7)
    rotary = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta)
    x = torch.randn(2, 9, cfg.hidden_size, dtype=torch.float64)
    rope = rotary(torch.arange(9), torch.float64)
    inputs = AttentionInputs(states=torch.randn(2, 5, cfg.hidden_size, dtype=torch.float64),
                             states_mask=torch.tensor([[True] * 5, [True, True, False, True, False]]), rotary=rotary)
    with torch.no_grad():
        whole, stats = attn(x, rope, None, 0, None, inputs)
        assert whole.shape == x.shape
        assert stats is None or (isinstance(stats, MoEStats) and stats.kind == kind)  # labelled by the kind
        cache = KVCache(1, 2, cfg.kv_heads, 9, cfg.head_dim, torch.float64, torch.device("cpu"))
        prompt, _ = attn(x[:, :8], rotary(torch.arange(8), torch.float64), cache, 0, None, inputs)
        cache.advance(8)
        step, _ = attn(x[:, 8:], rotary(torch.arange(8, 9), torch.float64), cache, 0, None, inputs)
    torch.testing.assert_close(torch.cat([prompt, step], 1), whole, rtol=0, atol=1e-12)


class _PositionWise(nn.Module):
    """A kind no Ava module knows: a projection of each position (so decoding from a cache is exact), which
    records how it was called and reports stats of its own kind."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.proj = nn.Linear(hidden, hidden, bias=False)
        self.calls: list[tuple[int, bool, bool, AttentionInputs | None]] = []

    def forward(self, x, rope, cache=None, layer=0, mask=None, inputs=None):
        self.calls.append((layer, cache is not None, mask is not None, inputs))
        y = self.proj(x)
        zero = torch.zeros((), dtype=x.dtype)
        stats = MoEStats(router_loss=0.1 * y.square().mean(), aux_loss=zero, z_loss=zero,
                         load=torch.ones(1, dtype=torch.int64), dropped_fraction=zero, entropy=zero, kind="positionwise")
        return y, stats


class _SecondLayerPositionWise(ModelConfig):
    def attention_kind(self, index: int) -> str:
        return "positionwise" if index == 1 else super().attention_kind(index)


def test_a_new_kind_in_the_table_is_built_and_called_by_the_block_and_the_model_with_no_other_change(monkeypatch):
    monkeypatch.setitem(ATTENTION_KINDS, "positionwise", lambda cfg, index: _PositionWise(cfg.hidden_size))
    torch.manual_seed(0)
    model = AvaForCausalLM(_SecondLayerPositionWise(**SMALL, use_moh=True)).double()
    custom = model.layers[1].attn
    assert isinstance(custom, _PositionWise) and model.layers[1].attn_kind == "positionwise"
    assert [b.attn_kind for b in model.layers] == ["moh", "positionwise", "moh"]

    ids = torch.randint(0, 64, (2, 12))
    segments = torch.tensor([[0] * 5 + [1] * 7, [0] * 12])
    documents = torch.zeros(2, 12, dtype=torch.long)
    out = model(ids, labels=ids, segment_ids=segments, context=Context(documents=documents))
    assert [s.kind for s in out.attention_stats] == ["moh", "positionwise", "moh"]
    torch.testing.assert_close(out.router_loss, sum(s.router_loss for s in out.attention_stats))
    layer, cached, masked, inputs = custom.calls[-1]
    assert layer == 1 and not cached and masked and inputs is not None and inputs.documents is documents
    out.loss.backward()
    assert custom.proj.weight.grad is not None and custom.proj.weight.grad.abs().sum() > 0

    model.eval()
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache(2, 12)
        steps = [model(ids[:, :7], cache=cache).logits] + [model(ids[:, t:t + 1], cache=cache).logits
                                                           for t in range(7, 12)]
    assert custom.calls[-1][:2] == (1, True)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=0, atol=1e-12)
    assert model.generate(ids[:, :4], 3, temperature=0).shape == (2, 7)


class _RecordingCross(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int, int | None, AttentionInputs | None]] = []

    def forward(self, x, rope, cache=None, layer=0, mask=None, inputs=None):
        self.calls.append((layer, cache.length if cache is not None else None, inputs))
        return x, None


def test_the_model_builds_its_cross_attention_blocks_from_the_table_and_calls_them_as_every_kind(monkeypatch):
    monkeypatch.setitem(ATTENTION_KINDS, "cross", lambda cfg, index: _RecordingCross())
    model = AvaForCausalLM(ModelConfig(**SMALL, use_cross_attention=True, use_rag=True,
                                       cross_attention={"every_n_layers": 2}, rag={"chunk_size": 4})).eval()
    assert list(model.cross_blocks) == ["0", "2"]
    ids = torch.randint(0, 64, (2, 8))
    neighbours = torch.randint(-1, 64, (2, 2, 3, 8))  # 2 chunks, 3 neighbours of 8 tokens each
    with torch.no_grad():
        cache = model.new_cache(2, 9)
        model(ids, cache=cache, context=Context(neighbours=neighbours))
        model(ids[:, :1], cache=cache, context=Context(neighbours=neighbours))
    calls = [(i, call) for i, block in model.cross_blocks.items() for call in block.calls]
    assert [(i, layer, length) for i, (layer, length, _) in calls] == [("0", 0, 0), ("0", 0, 8), ("2", 2, 0), ("2", 2, 8)]
    for _, (_, _, inputs) in calls:  # the neighbours arrive embedded, with their validity and the chunk size
        assert inputs is not None and inputs.chunk == 4
        assert inputs.states is not None and inputs.states.shape == (2, 2, 24, 32)
        assert inputs.states_mask is not None and torch.equal(inputs.states_mask, (neighbours >= 0).reshape(2, 2, 24))


def test_an_unknown_kind_is_an_error_that_names_the_registered_ones():
    with pytest.raises(ValueError, match="no attention kind 'sparse' .*standard, moh, moa, memory, cross"):
        make_attention("sparse", ModelConfig(**SMALL), 0)
