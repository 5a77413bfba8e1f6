"""Mixture-of-Head attention: routed heads weighted per token, standard attention as its special case."""

from __future__ import annotations

import torch

from ava.model.attention import CausalSelfAttention
from ava.model.moe.losses import load_balancing_loss
from ava.model.moh import MixtureOfHeadsAttention
from ava.model.rotary import RotaryEmbedding


def _pair(shared: int, active: int, kv: int = 4) -> tuple[MixtureOfHeadsAttention, CausalSelfAttention]:
    torch.manual_seed(0)
    moh = MixtureOfHeadsAttention(32, 4, kv, False, 0.0, shared, active, 0.01, 0.001).double()
    std = CausalSelfAttention(32, 4, kv, False, 0.0).double()
    std.load_state_dict({k: v for k, v in moh.state_dict().items() if not k.startswith("router.")})
    return moh, std


def test_all_heads_active_with_a_uniform_router_is_standard_attention():
    moh, std = _pair(shared=1, active=3)
    with torch.no_grad():
        for p in moh.router.parameters():
            p.zero_()
    x = torch.randn(2, 10, 32, dtype=torch.float64)
    rope = RotaryEmbedding(8, 16, 10000.0)(torch.arange(10), torch.float64)
    y, _ = moh(x, rope)
    torch.testing.assert_close(y, std(x, rope)[0], rtol=0, atol=1e-12)


def test_without_shared_heads_all_routed_heads_active_is_standard_attention():
    moh, std = _pair(shared=0, active=4, kv=2)
    with torch.no_grad():
        moh.router.routed_gate.weight.zero_()
    x = torch.randn(2, 7, 32, dtype=torch.float64)
    y, _ = moh(x, None)
    torch.testing.assert_close(y, std(x, None)[0], rtol=0, atol=1e-12)


def test_output_is_the_router_weighted_sum_of_the_chosen_heads_only():
    moh, std = _pair(shared=1, active=1)
    x = torch.randn(1, 6, 32, dtype=torch.float64)
    y, stats = moh(x, None)
    weights, _, _, ids = moh.router(x.reshape(6, 32))
    heads = std.heads(x, None)  # (1, 6, 4, 8)
    expected = torch.zeros(1, 6, 32, dtype=torch.float64)
    for t in range(6):
        active = [0, 1 + int(ids[t, 0])]  # the shared head and the one routed head
        assert set(torch.nonzero(weights[t]).flatten().tolist()) == set(active)
        for h in active:
            expected[0, t] += weights[t, h] * heads[0, t, h] @ std.o_proj.weight[:, h * 8:(h + 1) * 8].T
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-12)
    assert int(stats.load.sum()) == 6 and stats.kind == "moh"


def test_a_uniform_router_gives_every_active_head_weight_one():
    moh, _ = _pair(shared=2, active=1)
    with torch.no_grad():
        for p in moh.router.parameters():
            p.zero_()
    weights, _, _, _ = moh.router(torch.randn(5, 32, dtype=torch.float64))
    assert torch.equal((weights > 0).sum(-1), torch.full((5,), 3))
    torch.testing.assert_close(weights[weights > 0], torch.ones(15, dtype=torch.float64))


def test_the_balancing_loss_trains_the_router_and_reads_the_head_load():
    moh, _ = _pair(shared=1, active=2)
    x = torch.randn(3, 8, 32, dtype=torch.float64)
    _, stats = moh(x, None)
    _, probs, _, _ = moh.router(x.reshape(24, 32))
    torch.testing.assert_close(stats.aux_loss, load_balancing_loss(probs, stats.load, 2).detach())
    assert int(stats.load.sum()) == 24 * 2
    stats.router_loss.backward()
    assert moh.router.routed_gate.weight.grad is not None and moh.router.routed_gate.weight.grad.abs().sum() > 0


def test_the_language_loss_reaches_every_gate():
    moh, _ = _pair(shared=2, active=1)
    x = torch.randn(2, 6, 32, dtype=torch.float64)
    y, _ = moh(x, None)
    y.square().sum().backward()
    for gate in (moh.router.shared_gate, moh.router.routed_gate, moh.router.group_gate):
        assert gate is not None and gate.weight.grad is not None and gate.weight.grad.abs().sum() > 0
    assert moh.active_fraction == 0.75  # 2 shared + 1 of the 2 routed heads


def test_bf16_runs():
    moh = MixtureOfHeadsAttention(32, 4, 2, False, 0.0, 1, 2, 0.01, 0.0).to(torch.bfloat16)
    y, stats = moh(torch.randn(2, 5, 32, dtype=torch.bfloat16), None)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all() and torch.isfinite(stats.router_loss)
