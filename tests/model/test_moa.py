"""Mixture of Attention heads: equal to plain attention when it degenerates to it, to a naive per-token
reference otherwise (outputs and gradients), to itself when decoding from a KV cache; and its router stats."""

from __future__ import annotations

import math

import pytest
import torch

from ava.model.attention import CausalSelfAttention
from ava.model.kv_cache import KVCache
from ava.model.moa import MixtureOfAttention
from ava.model.moe.experts import grouped_mm_supported
from ava.model.rotary import RotaryEmbedding
from ava.model.transformer import document_positions_and_mask

HIDDEN, HEAD_DIM = 16, 4


def _moa(num_experts: int = 4, top_k: int = 2, heads: int = 2, kv_heads: int = 1, bias: bool = True,
         dtype: torch.dtype = torch.float64, dropout: float = 0.0) -> MixtureOfAttention:
    torch.manual_seed(0)
    moa = MixtureOfAttention(HIDDEN, num_experts, top_k, heads, kv_heads, HEAD_DIM, bias, dropout, 0.01, 0.001)
    for p in moa.parameters():
        torch.nn.init.normal_(p, std=0.5)
    return moa.to(dtype)


def _rope(positions: torch.Tensor, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    return RotaryEmbedding(HEAD_DIM, 64, 10000.0)(positions, dtype)


def _rotate(v: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, b: int, t: int) -> torch.Tensor:
    if rope is None:
        return v
    cos, sin = (table[t] if table.dim() == 2 else table[b, t] for table in rope)
    half = v.shape[-1] // 2
    return v * cos + torch.cat((-v[half:], v[:half])) * sin


def _reference(moa: MixtureOfAttention, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
               mask: torch.Tensor | None) -> torch.Tensor:
    """The paper's definition, one token, one chosen expert and one head at a time."""
    batch, seq, _ = x.shape
    h, d = moa.heads_per_expert, moa.head_dim
    per_kv = h // moa.num_kv_heads
    probs = torch.softmax(x @ moa.router.gate.weight.t(), dim=-1)
    weights, ids = probs.topk(moa.top_k, dim=-1)
    weights = weights / weights.sum(-1, keepdim=True)
    keys = moa.k_proj(x).view(batch, seq, moa.num_kv_heads, d)
    values = moa.v_proj(x).view(batch, seq, moa.num_kv_heads, d)
    outputs = []
    for b in range(batch):
        for t in range(seq):
            seen = [s for s in range(seq) if (bool(mask[b, 0, t, s]) if mask is not None else s <= t)]
            out = torch.zeros_like(x[b, t])
            for j in range(moa.top_k):
                e = int(ids[b, t, j])
                q = x[b, t] @ moa.q_proj[e] + (moa.q_bias[e] if moa.q_bias is not None else 0)
                heads = []
                for i in range(h):
                    c = i // per_kv
                    qi = _rotate(q[i * d:(i + 1) * d], rope, b, t)
                    k = torch.stack([_rotate(keys[b, s, c], rope, b, s) for s in seen])
                    p = torch.softmax(k @ qi / math.sqrt(d), dim=0)
                    heads.append(p @ values[b, seen, c])
                y = torch.cat(heads) @ moa.o_proj[e] + (moa.o_bias[e] if moa.o_bias is not None else 0)
                out = out + weights[b, t, j] * y
            outputs.append(out)
    return torch.stack(outputs).view_as(x)


@pytest.mark.parametrize("use_rope", [True, False])
def test_one_expert_top1_equals_causal_self_attention(use_rope):
    torch.manual_seed(0)
    attn = CausalSelfAttention(HIDDEN, 4, 2, True, 0.0).double()
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.5)
    moa = _moa(num_experts=1, top_k=1, heads=4, kv_heads=2)
    with torch.no_grad():
        moa.q_proj[0] = attn.q_proj.weight.t()
        moa.q_bias[0] = attn.q_proj.bias
        moa.o_proj[0] = attn.o_proj.weight.t()
        moa.o_bias[0] = attn.o_proj.bias
        moa.k_proj.load_state_dict(attn.k_proj.state_dict())
        moa.v_proj.load_state_dict(attn.v_proj.state_dict())
    x = torch.randn(2, 7, HIDDEN, dtype=torch.float64)
    rope = _rope(torch.arange(7)) if use_rope else None
    out, _ = moa(x, rope)
    torch.testing.assert_close(out, attn(x, rope)[0], atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize(("heads", "kv_heads"), [(2, 1), (2, 2), (4, 2)])
@pytest.mark.parametrize("packed", [False, True])
def test_equals_naive_per_token_reference(heads, kv_heads, packed):
    moa = _moa(heads=heads, kv_heads=kv_heads)
    x = torch.randn(2, 6, HIDDEN, dtype=torch.float64)
    if packed:
        positions, mask = document_positions_and_mask(torch.tensor([[0, 0, 0, 1, 1, 2], [3, 3, 4, 4, 4, 4]]))
    else:
        positions, mask = torch.arange(6), None
    rope = _rope(positions)
    out, _ = moa(x, rope, mask=mask)
    torch.testing.assert_close(out, _reference(moa, x, rope, mask), atol=1e-12, rtol=1e-10)


def test_gradients_equal_the_reference_and_unchosen_experts_get_none():
    moa = _moa(kv_heads=2)
    x = torch.randn(2, 5, HIDDEN, dtype=torch.float64)
    with torch.no_grad():  # a constant feature that expert 3's gate row scores very low: never chosen
        x[..., 0] = 3.0
        moa.router.gate.weight[3] = 0.0
        moa.router.gate.weight[3, 0] = -10.0
    x.requires_grad_(True)
    rope = _rope(torch.arange(5))
    out, stats = moa(x, rope)
    assert stats.load[3] == 0 and bool((stats.load[:3] > 0).all())
    g = torch.randn_like(out)
    params = dict(moa.named_parameters())
    got = torch.autograd.grad(out, [x, *params.values()], g)
    want = torch.autograd.grad(_reference(moa, x, rope, None), [x, *params.values()], g)
    for name, a, b in zip(["x", *params], got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8, msg=name)
    grads = dict(zip(params, got[1:], strict=True))
    assert grads["router.gate.weight"].abs().sum() > 0
    for name in ("q_proj", "o_proj", "q_bias", "o_bias"):
        per_expert = grads[name].flatten(1).abs().sum(1)
        assert per_expert[3] == 0 and bool((per_expert[:3] > 0).all()), name


def test_gradcheck_float64_output_and_router_loss():
    moa = _moa()
    x = torch.randn(1, 4, HIDDEN, dtype=torch.float64, requires_grad=True)
    rope = _rope(torch.arange(4))

    def f(inp):
        out, stats = moa(inp, rope)
        return out, stats.router_loss

    # Routing is piecewise constant in x; with this seed no token is at a top-k tie.
    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-6)


def test_kv_cache_prefill_chunk_and_decode_equal_the_full_forward():
    moa = _moa(heads=4, kv_heads=2)
    seq = 10
    x = torch.randn(2, seq, HIDDEN, dtype=torch.float64)
    full, _ = moa(x, _rope(torch.arange(seq)))
    cache = KVCache(1, 2, 2, seq, HEAD_DIM, torch.float64, torch.device("cpu"))
    steps = [(0, 4), (4, 7)] + [(t, t + 1) for t in range(7, seq)]  # prefill, a chunk after a prefix, decode
    pieces = []
    for start, stop in steps:
        out, _ = moa(x[:, start:stop], _rope(torch.arange(start, stop)), cache, 0)
        cache.advance(stop - start)
        pieces.append(out)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-12, rtol=1e-10)


def test_stats_count_every_assignment_and_router_loss_trains_the_gate():
    moa = _moa(num_experts=4, top_k=2)
    x = torch.randn(3, 5, HIDDEN, dtype=torch.float64)
    _, stats = moa(x, None)
    assert int(stats.load.sum()) == 3 * 5 * 2
    assert float(stats.dropped_fraction) == 0.0
    stats.router_loss.backward()
    assert moa.router.gate.weight.grad is not None and moa.router.gate.weight.grad.abs().sum() > 0


def test_uniform_router_scores_aux_loss_one_and_maximal_entropy():
    moa = _moa(num_experts=4, top_k=2)
    with torch.no_grad():
        moa.router.gate.weight.zero_()
    _, stats = moa(torch.randn(2, 6, HIDDEN, dtype=torch.float64), None)
    assert float(stats.aux_loss) == pytest.approx(1.0)
    assert float(stats.z_loss) == pytest.approx(math.log(4) ** 2)
    assert float(stats.entropy) == pytest.approx(math.log(4))


def test_float32_grouped_matmul_path_equals_float64_loop_path():
    assert grouped_mm_supported(torch.float32, (HIDDEN, 2 * HEAD_DIM))  # else this test compares the loop to itself
    moa64 = _moa()
    moa32 = _moa(dtype=torch.float32)
    x = torch.randn(2, 6, HIDDEN, dtype=torch.float64)
    out64, _ = moa64(x, _rope(torch.arange(6)))
    out32, _ = moa32(x.float(), _rope(torch.arange(6), torch.float32))
    torch.testing.assert_close(out32, out64.float(), atol=1e-4, rtol=1e-4)


def test_bf16_forward_and_backward_are_finite():
    moa = _moa(heads=4, kv_heads=2, dtype=torch.bfloat16)
    x = torch.randn(2, 8, HIDDEN, dtype=torch.bfloat16, requires_grad=True)
    out, stats = moa(x, _rope(torch.arange(8), torch.bfloat16))
    assert out.shape == x.shape and out.dtype == torch.bfloat16 and bool(out.isfinite().all())
    (out.float().square().mean() + stats.router_loss).backward()
    assert bool(moa.q_proj.grad.isfinite().all()) and bool(x.grad.isfinite().all())


def test_attention_dropout_applies_in_training_only():
    moa = _moa(dropout=0.5)
    x = torch.randn(1, 6, HIDDEN, dtype=torch.float64)
    moa.eval()
    evaluated, _ = moa(x, None)
    torch.testing.assert_close(evaluated, _reference(moa, x, None, None), atol=1e-12, rtol=1e-10)
    moa.train()
    trained, _ = moa(x, None)
    assert not torch.allclose(trained, evaluated)


def test_heads_per_expert_must_be_a_multiple_of_kv_heads():
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        MixtureOfAttention(HIDDEN, 4, 2, 3, 2, HEAD_DIM, False, 0.0, 0.01, 0.001)


def test_reset_parameters_and_active_fraction():
    moa = MixtureOfAttention(HIDDEN, 8, 2, 2, 1, HEAD_DIM, True, 0.0, 0.01, 0.001)
    moa.reset_parameters(0.5, 0.1)
    assert float(moa.q_proj.detach().std()) == pytest.approx(0.5, rel=0.15)
    assert float(moa.o_proj.detach().std()) == pytest.approx(0.1, rel=0.15)
    assert moa.q_bias is not None and moa.o_bias is not None
    assert bool((moa.q_bias == 0).all()) and bool((moa.o_bias == 0).all())
    assert moa.active_fraction() == 0.25
