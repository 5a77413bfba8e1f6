"""Gated cross-attention: the identity while its gates are closed; RETRO's chunked reading is causal."""

from __future__ import annotations

import pytest
import torch

from ava.config.schema.model import ModelConfig
from ava.model.attention_interface import AttentionInputs
from ava.model.cross_attention import GatedCrossAttention
from ava.model.kv_cache import KVCache
from ava.model.transformer import AvaForCausalLM, Context

BASE = dict(hidden_size=32, num_layers=4, num_attention_heads=4, intermediate_size=64, vocab_size=64,
            max_position_embeddings=64)


def _block() -> GatedCrossAttention:
    torch.manual_seed(0)
    return GatedCrossAttention(32, 24, 4, 64, "swiglu", "rmsnorm", 1e-5, False).double()


def _read(block: GatedCrossAttention, x: torch.Tensor, states: torch.Tensor, mask: torch.Tensor | None = None,
          chunk: int | None = None, start: int = 0) -> torch.Tensor:
    """The block called as every attention kind is: the context in `AttentionInputs`, x's first position
    `start` as the length of a KV cache (decoding)."""
    cache = None
    if start:
        cache = KVCache(0, x.shape[0], 1, start + x.shape[1], 1, x.dtype, x.device)
        cache.advance(start)
    out, stats = block(x, None, cache, 0, None, AttentionInputs(states=states, states_mask=mask, chunk=chunk))
    assert stats is None
    return out


def test_a_closed_gate_block_is_the_identity_and_its_gates_still_learn():
    block = _block()
    x = torch.randn(2, 5, 32, dtype=torch.float64, requires_grad=True)
    y = _read(block, x, torch.randn(2, 7, 24, dtype=torch.float64))
    assert torch.equal(y, x)
    y.square().sum().backward()
    assert block.attn_gate.grad is not None and block.attn_gate.grad.abs() > 0
    assert block.ffn_gate.grad is not None and block.ffn_gate.grad.abs() > 0


def test_a_model_with_closed_gate_blocks_computes_what_the_base_model_computes():
    torch.manual_seed(0)
    base = AvaForCausalLM(ModelConfig(**BASE, num_experts=4)).double()
    extended = AvaForCausalLM(ModelConfig(**BASE, num_experts=4, use_cross_attention=True, use_rag=True,
                                          cross_attention={"every_n_layers": 2}, rag={"chunk_size": 4})).double()
    missing, unexpected = extended.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("cross_blocks.") for k in missing)
    ids = torch.randint(0, 64, (2, 16))
    neighbours = torch.randint(0, 64, (2, 4, 2, 8))
    torch.testing.assert_close(extended(ids, context=Context(neighbours=neighbours)).logits, base(ids).logits,
                               rtol=0, atol=0)


def test_without_a_context_the_block_passes_x_through_untouched():
    block = _block()
    with torch.no_grad():
        block.attn_gate.fill_(1.0)
        block.ffn_gate.fill_(1.0)
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    for inputs in (None, AttentionInputs(documents=torch.zeros(2, 5, dtype=torch.long))):
        y, stats = block(x, None, None, 0, None, inputs)
        assert y is x and stats is None


def test_masked_context_positions_are_never_read():
    block = _block()
    with torch.no_grad():
        block.attn_gate.fill_(1.0)
    x, ctx = torch.randn(1, 3, 32, dtype=torch.float64), torch.randn(1, 6, 24, dtype=torch.float64)
    mask = torch.tensor([[True, True, True, False, False, False]])
    changed = ctx.clone()
    changed[:, 3:] = 100.0
    torch.testing.assert_close(_read(block, x, ctx, mask), _read(block, x, changed, mask), rtol=0, atol=0)
    assert not torch.allclose(_read(block, x, ctx), _read(block, x, changed))


def test_chunked_reading_sees_a_chunks_neighbours_only_once_the_chunk_is_complete():
    block = _block()
    with torch.no_grad():
        block.attn_gate.fill_(1.0)
        block.ffn_gate.zero_()
    chunk, seq = 4, 12
    x = torch.randn(1, seq, 32, dtype=torch.float64)
    neighbours = torch.randn(1, 3, 5, 24, dtype=torch.float64)  # 3 chunks, 5 neighbour positions each
    y = _read(block, x, neighbours, chunk=chunk)
    torch.testing.assert_close(y[:, :chunk - 1], x[:, :chunk - 1], rtol=0, atol=0)  # nothing complete yet
    for u in range(3):
        changed = neighbours.clone()
        changed[:, u] += 1.0
        moved = (_read(block, x, changed, chunk=chunk) - y).abs().amax(-1)[0] > 0
        reads = [(p + 1) // chunk - 1 == u for p in range(seq)]
        assert moved.tolist() == reads, (u, moved.tolist())


def test_chunked_reading_continues_at_the_right_chunk_during_decoding():
    block = _block()
    with torch.no_grad():
        block.attn_gate.fill_(1.0)
    x = torch.randn(1, 12, 32, dtype=torch.float64)
    neighbours = torch.randn(1, 3, 5, 24, dtype=torch.float64)
    whole = _read(block, x, neighbours, chunk=4)
    steps = torch.cat([_read(block, x[:, p:p + 1], neighbours, chunk=4, start=p) for p in range(12)], dim=1)
    torch.testing.assert_close(steps, whole, rtol=0, atol=1e-12)


def test_missing_neighbours_are_masked_out():
    torch.manual_seed(0)
    model = AvaForCausalLM(ModelConfig(**BASE, use_cross_attention=True, use_rag=True,
                                       rag={"chunk_size": 4})).double()
    with torch.no_grad():
        for block in model.cross_blocks.values():
            block.attn_gate.fill_(1.0)
    ids = torch.randint(0, 64, (1, 8))
    none = torch.full((1, 2, 1, 8), -1)
    one = none.clone()
    one[0, 1] = 5  # only chunk 1 has a neighbour: read by position 7 alone, the last token of chunk 1
    with_one = model(ids, context=Context(neighbours=one)).logits
    without = model(ids, context=Context(neighbours=none)).logits
    torch.testing.assert_close(with_one[:, :7], without[:, :7], rtol=0, atol=0)
    assert not torch.allclose(with_one[:, 7], without[:, 7])
    assert torch.isfinite(without).all()


def test_plain_context_given_as_token_ids_is_embedded_by_the_model():
    torch.manual_seed(0)
    model = AvaForCausalLM(ModelConfig(**BASE, use_cross_attention=True, use_rag=True)).double()
    with torch.no_grad():
        for block in model.cross_blocks.values():
            block.attn_gate.fill_(1.0)
    ids = torch.randint(0, 64, (2, 6))
    context_ids = torch.randint(0, 64, (2, 5))
    by_ids = model(ids, context=Context(states=context_ids)).logits
    by_states = model(ids, context=Context(states=model.embed_tokens(context_ids))).logits
    torch.testing.assert_close(by_ids, by_states, rtol=0, atol=0)


def test_a_pretrained_model_without_the_features_loads_into_one_with_them_for_init_from():
    from ava.errors import UserError
    from ava.model.store import load_state_exactly

    base = AvaForCausalLM(ModelConfig(**BASE))
    cfg = ModelConfig(**BASE, use_cross_attention=True, use_rag=True, use_moh=True,
                      moh={"num_shared_heads": 1, "active_routed_heads": 2}, use_episodic_memory=True)
    extended = AvaForCausalLM(cfg)
    load_state_exactly(extended, base.state_dict(), "base", allow_feature_added=True)
    torch.testing.assert_close(extended.layers[0].attn.q_proj.weight, base.layers[0].attn.q_proj.weight)
    with pytest.raises(UserError, match="cross_blocks.0"):  # an exact load reports them
        load_state_exactly(extended, base.state_dict(), "base")
    partial = {k: v for k, v in base.state_dict().items() if k != "layers.1.attn.q_proj.weight"}
    with pytest.raises(UserError, match=r"layers\.1\.attn\.q_proj\.weight"):  # a base weight is still required
        load_state_exactly(extended, partial, "base", allow_feature_added=True)


def test_reading_by_chunk_windows_equals_the_masked_reading_it_replaces():
    block = _block()
    with torch.no_grad():
        block.attn_gate.fill_(0.8)
        block.ffn_gate.fill_(-0.3)
    x = torch.randn(2, 12, 32, dtype=torch.float64)
    neighbours = torch.randn(2, 3, 5, 24, dtype=torch.float64)
    valid = torch.rand(2, 3, 5) > 0.3
    valid[0, 1] = False  # a chunk with no neighbour at all
    fast = _read(block, x, neighbours, valid, chunk=4)
    masked = _read(block, x[:, :11], neighbours, valid, chunk=4)  # not a whole number of chunks: the masked path
    torch.testing.assert_close(fast[:, :11], masked, rtol=0, atol=1e-12)
    stepwise = torch.cat([_read(block, x[:, p:p + 1], neighbours, valid, chunk=4, start=p) for p in range(12)], dim=1)
    torch.testing.assert_close(fast, stepwise, rtol=0, atol=1e-12)
