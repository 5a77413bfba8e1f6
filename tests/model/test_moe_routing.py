"""Routing semantics of the three routers, capacity dropping and dropless dispatch."""

from __future__ import annotations

import torch

from ava.model.moe import MoELayer
from ava.model.moe.dispatch import combine_rows, expert_capacity, gather_rows, plan_dispatch
from ava.model.moe.router import Router


def _router(kind: str, k: int = 2, experts: int = 8, hidden: int = 16) -> Router:
    torch.manual_seed(0)
    return Router(hidden, experts, k, kind)


def test_topk_weights_are_renormalised_softmax_of_the_top_k():
    router = _router("topk", k=2)
    x = torch.randn(32, 16)
    r = router(x)
    probs = torch.softmax(x @ router.gate.weight.t(), dim=-1)
    top, ids = probs.topk(2, dim=-1)
    assert torch.equal(r.expert_ids, ids)
    torch.testing.assert_close(r.weights, top / top.sum(-1, keepdim=True))
    torch.testing.assert_close(r.weights.sum(-1), torch.ones(32))


def test_switch_picks_the_argmax_weighted_by_its_probability():
    router = _router("switch", k=2)  # switch ignores k: always top-1
    x = torch.randn(32, 16)
    r = router(x)
    probs = torch.softmax(x @ router.gate.weight.t(), dim=-1)
    assert r.expert_ids.shape == (32, 1)
    assert torch.equal(r.expert_ids[:, 0], probs.argmax(-1))
    torch.testing.assert_close(r.weights[:, 0], probs.max(-1).values)  # not renormalised to 1


def test_aux_loss_free_bias_changes_choice_but_not_weights():
    router = _router("aux_loss_free", k=2, experts=4)
    x = torch.randn(64, 16)
    before = router(x)
    favourite = before.expert_ids[:, 0].mode().values
    router.expert_bias[favourite] = -10.0  # a heavily penalised expert is never chosen
    after = router(x)
    assert not (after.expert_ids == favourite).any()
    scores = torch.sigmoid(x @ router.gate.weight.t())
    chosen = scores.gather(-1, after.expert_ids)
    torch.testing.assert_close(after.weights, chosen / chosen.sum(-1, keepdim=True))


def test_aux_loss_free_bias_update_moves_towards_even_load():
    router = _router("aux_loss_free", k=1, experts=4)
    router.update_bias(torch.tensor([10.0, 2.0, 2.0, 2.0]), rate=0.01)
    torch.testing.assert_close(router.expert_bias, torch.tensor([-0.01, 0.01, 0.01, 0.01]))


def test_aux_loss_free_balances_load_over_updates():
    """A router skewed to expert 0 is evened out by the bias alone (no gradient step)."""
    router = _router("aux_loss_free", k=1, experts=4)
    with torch.no_grad():
        router.gate.weight[0] += 2.0
    x = torch.randn(512, 16).abs()
    def cv() -> float:
        load = torch.bincount(router(x).expert_ids.flatten(), minlength=4).float()
        return float(load.std(unbiased=False) / load.mean())
    start = cv()
    for _ in range(300):
        router.update_bias(torch.bincount(router(x).expert_ids.flatten(), minlength=4), rate=0.01)
    assert start > 1.0 and cv() < 0.25


def test_capacity_drops_exactly_the_over_capacity_assignments_first_choices_first():
    # T=3 tokens, E=3 experts, k=2. Expert 0 is the second choice of tokens 0 and 1 and the first
    # choice of token 2; with capacity 1, token 2's first choice wins over the earlier second choices.
    ids = torch.tensor([[1, 0], [2, 0], [0, 1]])
    weights = torch.tensor([[0.6, 0.4], [0.7, 0.3], [0.8, 0.2]])
    plan = plan_dispatch(ids, weights, num_experts=3, capacity=1)
    kept = {(int(plan.order[i]) % 3, int(plan.order[i]) // 3) for i in range(6) if plan.weights[i] > 0}
    # (token, choice) pairs processed: expert 0 -> token 2 first choice; expert 1 -> token 0 first
    # choice (token 2's second choice dropped); expert 2 -> token 1 first choice.
    assert kept == {(2, 0), (0, 0), (1, 0)}
    assert plan.kept.tolist() == [1, 1, 1] and plan.counts.tolist() == [3, 2, 1]


def test_capacity_is_ceil_of_factor_times_even_share():
    assert expert_capacity(100, 2, 8, 1.25) == 32  # ceil(1.25 * 200 / 8 = 31.25)
    assert expert_capacity(100, 2, 8, None) is None and expert_capacity(100, 2, 8, 0.0) is None


def test_dispatch_then_combine_is_the_weighted_sum_of_each_tokens_experts():
    torch.manual_seed(0)
    x = torch.randn(5, 4)
    ids = torch.tensor([[0, 2], [1, 0], [2, 1], [0, 1], [2, 0]])
    weights = torch.rand(5, 2)
    plan = plan_dispatch(ids, weights, num_experts=3, capacity=None)
    rows = gather_rows(x, plan)
    scale = torch.tensor([1.0, 10.0, 100.0])  # expert e multiplies its rows by scale[e]
    sorted_experts = ids.t().reshape(-1)[plan.order]
    out = combine_rows(rows * scale[sorted_experts][:, None], plan)
    expected = torch.stack([sum(weights[t, j] * scale[ids[t, j]] * x[t] for j in range(2)) for t in range(5)])
    torch.testing.assert_close(out, expected)


def _layer(capacity: float | None, kind: str = "topk", k: int = 2) -> MoELayer:
    torch.manual_seed(0)
    layer = MoELayer(16, 32, 4, k, kind, "swiglu", capacity, 0.01, 0.001)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return layer


def test_dropless_drops_nothing_even_when_one_expert_takes_every_token():
    layer = _layer(None)
    with torch.no_grad():
        layer.router.gate.weight.zero_()
        layer.router.gate.weight[0] = 5.0  # every token prefers expert 0
    x = torch.rand(2, 32, 16)
    _, stats = layer(x)
    assert float(stats.dropped_fraction) == 0.0
    assert stats.load[0].item() == 64


def test_fully_dropped_token_gets_zero_from_the_layer_and_keeps_its_residual():
    layer = _layer(0.25, k=1)  # capacity ceil(0.25 * 8 / 4) = 1 token per expert
    with torch.no_grad():
        layer.router.gate.weight.zero_()
        layer.router.gate.weight[0] = 5.0
    x = torch.rand(1, 8, 16)
    out, stats = layer(x)
    # All 8 tokens chose expert 0; only the first is processed, the other 7 are dropped.
    assert abs(float(stats.dropped_fraction) - 7 / 8) < 1e-6
    assert out[0, 0].abs().sum() > 0
    assert torch.equal(out[0, 1:], torch.zeros(7, 16))


def test_stats_report_load_entropy_and_losses_per_forward():
    layer = _layer(None)
    _, stats = layer(torch.randn(3, 10, 16))
    assert stats.load.sum().item() == 3 * 10 * 2
    assert 0 < float(stats.entropy) <= float(torch.log(torch.tensor(4.0))) + 1e-6
    assert stats.router_loss.requires_grad and not stats.aux_loss.requires_grad
    torch.testing.assert_close(stats.router_loss, 0.01 * stats.aux_loss + 0.001 * stats.z_loss)
