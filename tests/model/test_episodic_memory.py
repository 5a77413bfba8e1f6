"""Episodic kNN memory attention (Memorizing Transformers): local windows plus an exact top-k memory."""

from __future__ import annotations

import math

import pytest
import torch

from ava.model.attention import CausalSelfAttention
from ava.model.attention_interface import AttentionInputs
from ava.model.episodic_memory import EpisodicMemoryAttention
from ava.model.kv_cache import KVCache
from ava.model.rotary import RotaryEmbedding, apply_rotary
from ava.model.transformer import document_positions_and_mask

HIDDEN, HEADS, KV_HEADS = 16, 4, 2
HEAD_DIM = HIDDEN // HEADS


def _layer(segment_length: int, memory_size: int, top_k: int, kv_heads: int = KV_HEADS,
           gate: float | None = None, dtype: torch.dtype = torch.float64) -> EpisodicMemoryAttention:
    torch.manual_seed(0)
    layer = EpisodicMemoryAttention(HIDDEN, HEADS, kv_heads, True, 0.0, segment_length, memory_size, top_k)
    with torch.no_grad():
        if gate is None:
            layer.memory_gate.normal_()  # a different mix per head, so a head mix-up shows
        else:
            layer.memory_gate.fill_(gate)
    return layer.to(dtype).eval()


def _rope(positions: torch.Tensor, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    return RotaryEmbedding(HEAD_DIM, 64, 10000.0)(positions, dtype)


def _x(batch: int, seq: int, seed: int = 1, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(batch, seq, HIDDEN, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _reference(layer: EpisodicMemoryAttention, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
               documents: torch.Tensor) -> torch.Tensor:
    """The layer written as loops over rows, heads and queries, straight from the definition."""
    batch, seq, _ = x.shape
    heads, kv_heads, dim = layer.num_heads, layer.num_kv_heads, layer.head_dim
    length, size, top_k = layer.segment_length, layer.memory_size, layer.top_k
    q = layer.q_proj(x).view(batch, seq, heads, dim).transpose(1, 2)
    k = layer.k_proj(x).view(batch, seq, kv_heads, dim).transpose(1, 2)
    v = layer.v_proj(x).view(batch, seq, kv_heads, dim).transpose(1, 2)
    q_rot, k_rot = (apply_rotary(q, *rope), apply_rotary(k, *rope)) if rope is not None else (q, k)
    out = torch.zeros(batch, heads, seq, dim, dtype=x.dtype)
    for b in range(batch):
        for h in range(heads):
            kv = h // (heads // kv_heads)
            gate = torch.sigmoid(layer.memory_gate[h])
            for i in range(seq):
                same = [j for j in range(seq) if documents[b, j] == documents[b, i]]
                near = [j for j in same if j <= i and j // length == i // length]
                scores = torch.stack([q_rot[b, h, i] @ k_rot[b, kv, j] for j in near]) / math.sqrt(dim)
                local = sum(p * v[b, kv, j] for p, j in zip(scores.softmax(0), near, strict=True))
                memory = local
                entries = [j for j in same if j // length < i // length and i - j <= size]
                if entries:
                    scored = sorted(((float(q[b, h, i] @ k[b, kv, j]), j) for j in entries), reverse=True)[:top_k]
                    weights = (torch.tensor([s for s, _ in scored], dtype=x.dtype) / math.sqrt(dim)).softmax(0)
                    memory = sum(w * v[b, kv, j] for w, (_, j) in zip(weights, scored, strict=True))
                out[b, h, i] = gate * memory + (1 - gate) * local
    return layer.o_proj(out.transpose(1, 2).reshape(batch, seq, heads * dim))


@pytest.mark.parametrize("use_rope", [False, True])
@pytest.mark.parametrize("packed", [False, True])
def test_one_segment_covering_the_sequence_is_plain_causal_attention(use_rope, packed):
    seq = 12
    layer = _layer(segment_length=seq, memory_size=8, top_k=2)
    plain = CausalSelfAttention(HIDDEN, HEADS, KV_HEADS, True, 0.0).to(torch.float64).eval()
    missing, unexpected = plain.load_state_dict(layer.state_dict(), strict=False)
    assert not missing and unexpected == ["memory_gate"]
    x = _x(2, seq)
    mask, documents, positions = None, None, torch.arange(seq)
    if packed:
        documents = torch.tensor([[0] * 5 + [1] * 7, [0] * 9 + [1] * 3])
        positions, mask = document_positions_and_mask(documents)
    rope = _rope(positions) if use_rope else None
    with torch.no_grad():
        torch.testing.assert_close(layer(x, rope, mask=mask, inputs=AttentionInputs(documents=documents))[0],
                                   plain(x, rope, mask=mask)[0],
                                   rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("use_rope", [False, True])
def test_matches_a_naive_loop_reference_with_packed_documents_and_grouped_query_heads(use_rope):
    # Document boundaries fall inside segments; memory_size cuts some entries and top_k others.
    documents = torch.tensor([[0] * 10 + [1] * 9 + [2] * 5, [0] * 3 + [1] * 21])
    positions, mask = document_positions_and_mask(documents)
    layer = _layer(segment_length=4, memory_size=10, top_k=3)
    x = _x(2, 24)
    rope = _rope(positions) if use_rope else None
    with torch.no_grad():
        got = layer(x, rope, mask=mask, inputs=AttentionInputs(documents=documents))[0]
        want = _reference(layer, x, rope, documents)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_memory_is_cleared_between_documents_but_carries_within_one():
    documents = torch.tensor([[0] * 10 + [1] * 14])  # B starts mid-segment at 10
    positions, mask = document_positions_and_mask(documents)
    layer = _layer(segment_length=4, memory_size=24, top_k=4, gate=8.0)  # the memory dominates the mix
    rope = _rope(positions)
    x = _x(1, 24)

    def run(hidden: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return layer(hidden, rope, mask=mask, inputs=AttentionInputs(documents=documents))[0][0]

    base = run(x)
    new_a, new_b = x.clone(), x.clone()
    new_a[:, :10] = _x(1, 10, seed=2)
    new_b[:, 10:] = _x(1, 14, seed=3)
    torch.testing.assert_close(run(new_a)[10:], base[10:], rtol=0, atol=0)
    torch.testing.assert_close(run(new_b)[:10], base[:10], rtol=0, atol=0)
    # B's segment 3 (positions 12-15) reaches positions 20-23 (segment 5) through the memory alone.
    earlier = x.clone()
    earlier[:, 12:16] = _x(1, 4, seed=4)
    changed = run(earlier)
    torch.testing.assert_close(changed[:12], base[:12], rtol=0, atol=0)
    assert (changed[20:] - base[20:]).abs().amax(dim=-1).min() > 1e-3


def test_entries_older_than_memory_size_have_no_influence():
    layer = _layer(segment_length=4, memory_size=6, top_k=16, gate=8.0)
    x = _x(1, 16)

    def last(inputs: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return layer(inputs, _rope(torch.arange(16)))[0][0, 15]

    # Position 15 (segment 3) remembers positions 15-6 = 9 .. 11; position 8 is one too old.
    too_old, oldest_kept = x.clone(), x.clone()
    too_old[:, :9] = _x(1, 9, seed=5)
    oldest_kept[:, 9] = _x(1, 1, seed=6)[:, 0]
    torch.testing.assert_close(last(too_old), last(x), rtol=0, atol=0)
    assert (last(oldest_kept) - last(x)).abs().max() > 1e-3


def test_no_gradient_flows_into_the_memory_but_the_gate_learns():
    layer = _layer(segment_length=4, memory_size=16, top_k=4, gate=8.0)
    x = _x(1, 12).requires_grad_()
    out, _ = layer(x, _rope(torch.arange(12)))
    out[0, 8:].sum().backward()  # segment 2, which reads segments 0 and 1 from memory only
    assert x.grad is not None and layer.memory_gate.grad is not None
    assert torch.count_nonzero(x.grad[0, :8]) == 0
    assert x.grad[0, 8:].abs().min() > 0
    assert layer.memory_gate.grad.abs().min() > 0
    # The earlier segments do shape that output: the zero gradient is the detach, not a missing path.
    with torch.no_grad():
        moved = x.detach().clone()
        moved[:, :8] += 1.0
        assert (layer(moved, _rope(torch.arange(12)))[0][0, 8:] - out[0, 8:]).abs().min() > 1e-6


def test_kv_cache_decoding_matches_the_full_forward():
    layer = _layer(segment_length=4, memory_size=7, top_k=3)
    seq = 19
    x = _x(2, seq)
    with torch.no_grad():
        full, _ = layer(x, _rope(torch.arange(seq)))
        cache = KVCache(1, 2, KV_HEADS, seq, HEAD_DIM, torch.float64, torch.device("cpu"))
        steps = [(0, 6), (6, 9)] + [(p, p + 1) for p in range(9, seq)]  # prefill, a chunk, then one at a time
        pieces = []
        for start, end in steps:
            pieces.append(layer(x[:, start:end], _rope(torch.arange(end)), cache=cache)[0])
            cache.advance(end - start)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-12, atol=1e-12)


def test_cached_decoding_rejects_rope_tables_of_the_new_positions_only():
    layer = _layer(segment_length=4, memory_size=7, top_k=3)
    cache = KVCache(1, 1, KV_HEADS, 8, HEAD_DIM, torch.float64, torch.device("cpu"))
    with torch.no_grad():
        layer(_x(1, 5), _rope(torch.arange(5)), cache=cache)
        cache.advance(5)
        with pytest.raises(ValueError, match="needs all 6"):
            layer(_x(1, 1), _rope(torch.arange(5, 6)), cache=cache)


def test_bfloat16_forward_and_backward_are_finite():
    documents = torch.tensor([[0] * 20 + [1] * 12])
    positions, mask = document_positions_and_mask(documents)
    layer = _layer(segment_length=8, memory_size=16, top_k=4, dtype=torch.bfloat16).train()
    x = _x(1, 32, dtype=torch.bfloat16).requires_grad_()
    out, _ = layer(x, _rope(positions, torch.bfloat16), mask=mask, inputs=AttentionInputs(documents=documents))
    out.float().square().mean().backward()
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer.parameters())


def test_given_the_new_positions_tables_with_a_cache_the_layer_asks_the_model_rotary_for_every_position():
    """What the model does: it gives every kind the tables of the new positions, and the rotary embedding."""
    layer = _layer(segment_length=4, memory_size=7, top_k=3)
    rotary = RotaryEmbedding(HEAD_DIM, 64, 10000.0)
    seq = 11
    x = _x(2, seq)
    with torch.no_grad():
        full, _ = layer(x, _rope(torch.arange(seq)))
        cache = KVCache(1, 2, KV_HEADS, seq, HEAD_DIM, torch.float64, torch.device("cpu"))
        pieces = []
        for start, end in [(0, 6)] + [(p, p + 1) for p in range(6, seq)]:
            out, _ = layer(x[:, start:end], _rope(torch.arange(start, end)), cache=cache,
                           inputs=AttentionInputs(rotary=rotary))
            pieces.append(out)
            cache.advance(end - start)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-12, atol=1e-12)
