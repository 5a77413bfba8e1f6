"""The RLHF losses equal their formulas, checked against plain-Python / float64 references and hand numbers."""

from __future__ import annotations

import math

import pytest
import torch

from ava.rlhf.losses import (
    dpo_loss,
    gae,
    group_advantages,
    kl_penalty,
    masked_mean,
    masked_sum,
    masked_whiten,
    pairwise_reward_loss,
    ppo_policy_loss,
    token_entropy,
    token_logprobs,
    value_loss,
)


def _close(actual: torch.Tensor, expected: float | torch.Tensor, tol: float = 1e-6) -> None:
    expected_t = torch.as_tensor(expected, dtype=actual.dtype)
    torch.testing.assert_close(actual, expected_t, atol=tol, rtol=tol)


# --- masked statistics -------------------------------------------------------


def test_masked_mean_of_an_empty_mask_is_zero_not_nan():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    empty = torch.zeros(2, 2, dtype=torch.bool)
    _close(masked_mean(x, empty), 0.0)
    _close(masked_mean(x, empty, dim=1), torch.zeros(2))


def test_masked_sum_and_mean_ignore_inf_and_nan_under_the_mask_and_accept_float_masks():
    x = torch.tensor([[1.0, 2.0, float("inf")], [4.0, float("nan"), 6.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
    _close(masked_sum(x, mask), 13.0)
    _close(masked_mean(x, mask), 13.0 / 4)
    _close(masked_mean(x, mask, dim=1), torch.tensor([1.5, 5.0]))


def _whiten_reference(values: list[float]) -> list[float]:
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1)  # unbiased, like TRL
    return [(v - mean) / math.sqrt(var + 1e-8) for v in values]


def test_masked_whiten_standardises_masked_entries_with_unbiased_variance_and_zeroes_the_rest():
    x = torch.tensor([[1.0, 2.0, 100.0], [4.0, -50.0, 7.0]])
    mask = torch.tensor([[True, True, False], [True, False, True]])
    out = masked_whiten(x, mask)
    expected = _whiten_reference([1.0, 2.0, 4.0, 7.0])
    _close(out[mask], torch.tensor(expected), tol=1e-5)
    _close(out[~mask], torch.zeros(2))
    # what sits under the mask does not matter
    _close(masked_whiten(x.masked_fill(~mask, 1e6), mask), out)
    _close(masked_mean(out, mask), 0.0, tol=1e-6)
    _close(out[mask].var(), 1.0, tol=1e-5)


def test_masked_whiten_without_shift_keeps_the_mean():
    x = torch.tensor([3.0, 5.0, 10.0, -1.0])
    mask = torch.tensor([True, True, True, False])
    out = masked_whiten(x, mask, shift_mean=False)
    expected = [v + 6.0 for v in _whiten_reference([3.0, 5.0, 10.0])]
    _close(out[:3], torch.tensor(expected), tol=1e-5)
    _close(out[3], 0.0)


def test_masked_whiten_with_all_reduce_over_two_ranks_equals_whitening_the_whole_batch_in_one_call():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, generator=gen) * 3 + 1
    mask = torch.rand(4, 6, generator=gen) > 0.3
    halves = [(x[:2], mask[:2]), (x[2:], mask[2:])]

    # Each rank's local stats, as it would hand them to the collective.
    local: list[torch.Tensor] = []
    for xs, ms in halves:
        masked_whiten(xs, ms, all_reduce=lambda s: local.append(s.clone()) or s)
    calls = []

    def all_reduce(stats: torch.Tensor) -> torch.Tensor:
        calls.append(stats)
        return local[0] + local[1]

    per_rank = [masked_whiten(xs, ms, all_reduce=all_reduce) for xs, ms in halves]
    _close(torch.cat(per_rank), masked_whiten(x, mask), tol=1e-6)
    assert len(calls) == 2  # exactly one collective per rank


# --- token log-probs and entropy --------------------------------------------


def test_token_logprobs_equal_float64_log_softmax_gather_of_the_next_token():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 5, 11, generator=gen) * 4
    ids = torch.randint(0, 11, (3, 5), generator=gen)
    out = token_logprobs(logits, ids)
    ref = torch.log_softmax(logits.double(), -1)[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    assert out.shape == (3, 4) and out.dtype == torch.float32
    _close(out, ref.float(), tol=1e-5)


def test_token_logprobs_of_bf16_logits_are_float32_and_exact_for_those_logits():
    gen = torch.Generator().manual_seed(2)
    logits = (torch.randn(2, 4, 50, generator=gen) * 5).bfloat16()
    ids = torch.randint(0, 50, (2, 4), generator=gen)
    out = token_logprobs(logits, ids)
    ref = torch.log_softmax(logits.double(), -1)[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    assert out.dtype == torch.float32
    _close(out, ref.float(), tol=1e-5)  # float32 maths on the bf16 values: no bf16 rounding of the result


def test_token_logprobs_pass_gradient_to_the_logits():
    logits = torch.randn(2, 3, 7, requires_grad=True)
    token_logprobs(logits.bfloat16(), torch.randint(0, 7, (2, 3))).sum().backward()
    assert logits.grad is not None and logits.grad[:, :-1].abs().sum() > 0
    assert logits.grad[:, -1].abs().sum() == 0  # the last position predicts nothing in the sequence


def _entropy_reference(logits: torch.Tensor) -> torch.Tensor:
    p = torch.softmax(logits.double(), -1)[:, :-1]
    return -(p * p.log()).sum(-1)


def test_token_entropy_is_log_v_for_uniform_logits_and_matches_float64_reference():
    _close(token_entropy(torch.zeros(2, 4, 13)), torch.full((2, 3), math.log(13)), tol=1e-6)
    logits = torch.randn(2, 4, 9, generator=torch.Generator().manual_seed(3)) * 3
    _close(token_entropy(logits), _entropy_reference(logits).float(), tol=1e-5)
    half = logits.bfloat16()
    out = token_entropy(half)
    assert out.shape == (2, 3) and out.dtype == torch.float32
    _close(out, _entropy_reference(half).float(), tol=1e-5)


# --- reward model and DPO ----------------------------------------------------


def test_pairwise_reward_loss_accuracy_and_margin_by_hand():
    chosen, rejected = torch.tensor([2.0, 0.0, 1.0]), torch.tensor([1.0, 1.0, 1.0])
    loss, acc, margin = pairwise_reward_loss(chosen, rejected)
    softplus = lambda z: math.log1p(math.exp(z))  # noqa: E731  -logsigmoid(x) = softplus(-x)
    _close(loss, (softplus(-1) + softplus(1) + softplus(0)) / 3)
    _close(acc, 1 / 3)  # a tie is not a win
    _close(margin, 0.0)
    loss_m, _, _ = pairwise_reward_loss(chosen, rejected, margin=torch.tensor([0.5, 0.0, 1.0]))
    _close(loss_m, (softplus(-0.5) + softplus(1) + softplus(1)) / 3)
    loss_f, _, _ = pairwise_reward_loss(chosen, rejected, margin=0.5)
    _close(loss_f, (softplus(-0.5) + softplus(1.5) + softplus(0.5)) / 3)


def test_dpo_sigmoid_loss_is_log_two_when_policy_equals_reference():
    lp = torch.tensor([-5.0, -3.0])
    losses, chosen_r, rejected_r = dpo_loss(lp, lp - 1, lp, lp - 1, beta=0.1)
    _close(losses, torch.full((2,), math.log(2)))
    _close(chosen_r, torch.zeros(2))
    _close(rejected_r, torch.zeros(2))


def test_dpo_gradient_raises_chosen_and_lowers_rejected_logprob():
    chosen = torch.tensor([-4.0], requires_grad=True)
    rejected = torch.tensor([-4.0], requires_grad=True)
    losses, _, _ = dpo_loss(chosen, rejected, torch.tensor([-4.0]), torch.tensor([-4.0]), beta=0.5)
    losses.sum().backward()
    assert chosen.grad is not None and rejected.grad is not None
    assert chosen.grad.item() < 0 < rejected.grad.item()  # descent moves chosen up, rejected down


def test_dpo_label_smoothing_and_rewards_by_hand():
    pc, pr, rc, rr = torch.tensor([-2.0]), torch.tensor([-5.0]), torch.tensor([-3.0]), torch.tensor([-4.0])
    beta, ls = 0.5, 0.1
    x = beta * ((-2 + 5) - (-3 + 4))  # beta * logits = 1
    losses, chosen_r, rejected_r = dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=ls)
    _close(losses, torch.tensor([(1 - ls) * math.log1p(math.exp(-x)) + ls * math.log1p(math.exp(x))]))
    _close(chosen_r, torch.tensor([0.5 * (-2 + 3)]))
    _close(rejected_r, torch.tensor([0.5 * (-5 + 4)]))


def test_ipo_loss_is_squared_distance_of_logits_to_one_over_two_beta():
    pc, pr, rc, rr = torch.tensor([-1.0, -2.0]), torch.tensor([-2.0, -1.0]), torch.zeros(2), torch.zeros(2)
    losses, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.25, loss_type="ipo")
    _close(losses, torch.tensor([(1 - 2) ** 2, (-1 - 2) ** 2], dtype=torch.float32))
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(pc, pr, rc, rr, beta=0.25, loss_type="ipo", label_smoothing=0.1)
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(pc, pr, rc, rr, beta=0.25, loss_type="hinge")


# --- KL estimators -----------------------------------------------------------


def test_kl_estimators_by_hand_and_k3_nonnegative_and_finite_for_extreme_ratios():
    logp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-2.0, -1.0])
    _close(kl_penalty(logp, ref, "k1"), torch.tensor([1.0, -1.0]))
    _close(kl_penalty(logp, ref, "k2"), torch.tensor([0.5, 0.5]))
    _close(kl_penalty(logp, ref, "k3"), torch.tensor([math.exp(-1) + 1 - 1, math.exp(1) - 1 - 1]))
    extreme = torch.tensor([50.0, -50.0, 1e-7, -1e-7, 0.0])
    k3 = kl_penalty(extreme, torch.zeros(5), "k3")
    assert torch.isfinite(k3).all() and (k3 >= 0).all()
    assert k3[4] == 0


@pytest.mark.parametrize("drift", [-30.0, -21.0, 21.0, 30.0, 60.0])
def test_k3_keeps_pulling_the_policy_back_however_far_it_drifted(drift):
    # drift = log(pi / ref) of a sampled token; the penalty must grow with |drift| and its gradient point back.
    logp = torch.tensor([drift], dtype=torch.float64, requires_grad=True)
    value = kl_penalty(logp, torch.zeros(1, dtype=torch.float64), "k3")
    value.sum().backward()
    assert torch.isfinite(value).all() and torch.isfinite(logp.grad).all()
    assert value.item() > kl_penalty(torch.tensor([drift / 2]), torch.zeros(1), "k3").item()
    assert value.dtype == torch.float64
    assert logp.grad.item() * drift > 0  # descending the penalty moves log(pi/ref) back towards 0
    if drift > 0:  # exact there: e^r - r - 1 with r = -drift; beyond r = 20 it is the tangent line
        assert value.item() == pytest.approx(math.expm1(-drift) + drift, rel=1e-5)
    else:
        bound = 20.0
        tangent = math.expm1(bound) - bound + (-drift - bound) * math.expm1(bound)
        assert value.item() == pytest.approx(tangent, rel=1e-12)


def test_k1_and_k3_averaged_over_samples_from_pi_estimate_the_true_kl():
    p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    q = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    true_kl = float((p * (p / q).log()).sum())  # ~0.2749
    n = 200_000
    x = torch.multinomial(p, n, replacement=True, generator=torch.Generator().manual_seed(0))
    logp, ref = p.log()[x], q.log()[x]
    for estimator in ("k1", "k3"):
        samples = kl_penalty(logp, ref, estimator)
        # Unbiased estimators: the mean is within 5 standard errors (sd <= 0.72 here, SE ~ 0.0016)
        # of the true KL; a biased one (k2's mean is ~0.29) would fail.
        standard_error = float(samples.std()) / math.sqrt(n)
        assert abs(float(samples.mean()) - true_kl) < 5 * standard_error, estimator


# --- GAE ---------------------------------------------------------------------


def _gae_reference(rewards, values, mask, gamma, lam):
    adv = [[0.0] * len(r) for r in rewards]
    for b, row in enumerate(mask):
        valid = [t for t, m in enumerate(row) if m]
        running, next_value = 0.0, 0.0
        for t in reversed(valid):
            delta = rewards[b][t] + gamma * next_value - values[b][t]
            running = delta + gamma * lam * running
            adv[b][t], next_value = running, values[b][t]
    return adv


def test_gae_equals_a_per_row_reversed_loop_over_different_spans_and_is_zero_outside():
    gen = torch.Generator().manual_seed(4)
    rewards = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    values = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1], [0, 0, 0, 1, 0, 0], [0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    expected = torch.tensor(_gae_reference(rewards.tolist(), values.tolist(), mask.tolist(), 0.9, 0.8), dtype=torch.float64)
    torch.testing.assert_close(adv, expected)
    torch.testing.assert_close(ret, torch.where(mask, expected + values, torch.zeros_like(values)))
    assert (adv[~mask] == 0).all() and (ret[~mask] == 0).all()


def test_gae_with_gamma_and_lambda_one_returns_the_sum_of_future_rewards_without_gradient():
    rewards = torch.tensor([[9.0, 1.0, 2.0, 3.0, 9.0], [9.0, 9.0, 0.5, 0.5, 0.0]])
    values = torch.tensor([[5.0, 0.3, -1.0, 2.0, 7.0], [1.0, 1.0, 4.0, -2.0, 0.0]], requires_grad=True)
    mask = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 1, 1, 0]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    _close(ret, torch.tensor([[0.0, 6.0, 5.0, 3.0, 0.0], [0.0, 0.0, 1.0, 0.5, 0.0]]))
    assert not adv.requires_grad and not ret.requires_grad


# --- PPO ---------------------------------------------------------------------


def test_ppo_loss_at_ratio_one_is_minus_mean_advantage_with_no_clipping():
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -9.0]])
    adv = torch.tensor([[1.0, -2.0, 3.0], [0.5, 4.0, 100.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    loss, clip_fraction, approx_kl = ppo_policy_loss(logp, logp.clone(), adv, mask, clip_range=0.2)
    _close(loss, -(1 - 2 + 3 + 0.5 + 4) / 5)
    _close(clip_fraction, 0.0)
    _close(approx_kl, 0.0)


def test_ppo_clips_a_ratio_outside_the_range_only_when_the_advantage_sign_matches_and_stops_its_gradient():
    old = torch.zeros(1, 4)
    # ratios 1.5, 1.5, 0.5, 0.5 against advantages +1, -1, -1, +1 with clip 0.2
    logp = torch.log(torch.tensor([[1.5, 1.5, 0.5, 0.5]])).requires_grad_()
    adv = torch.tensor([[1.0, -1.0, -1.0, 1.0]])
    loss, clip_fraction, approx_kl = ppo_policy_loss(logp, old, adv, torch.ones(1, 4), clip_range=0.2)
    _close(loss, (-1.2 + 1.5 + 0.8 - 0.5) / 4)
    _close(clip_fraction, 0.5)  # tokens 0 and 2: the clipped branch is the larger loss
    _close(approx_kl, 0.5 * (2 * math.log(1.5) ** 2 + 2 * math.log(0.5) ** 2) / 4)
    assert not clip_fraction.requires_grad and not approx_kl.requires_grad
    loss.backward()
    assert logp.grad is not None
    _close(logp.grad, torch.tensor([[0.0, 1.5 / 4, 0.0, -0.5 / 4]]))  # d(-A*ratio)/dlogp = -A*ratio


def test_ppo_sequence_mean_weighs_rows_equally_and_differs_from_token_mean():
    logp = torch.zeros(2, 4)
    adv = torch.tensor([[1.0, 0.0, 0.0, 0.0], [2.0, 2.0, 2.0, 2.0]])
    mask = torch.tensor([[1, 0, 0, 0], [1, 1, 1, 1]])
    token, _, _ = ppo_policy_loss(logp, logp, adv, mask, 0.2, aggregation="token_mean")
    sequence, _, _ = ppo_policy_loss(logp, logp, adv, mask, 0.2, aggregation="sequence_mean")
    _close(token, -(1 + 8) / 5)
    _close(sequence, -(1 / 1 + 8 / 4) / 2)
    # a row with no tokens does not dilute the sequence mean
    padded, _, _ = ppo_policy_loss(
        torch.zeros(3, 4),
        torch.zeros(3, 4),
        torch.cat([adv, torch.ones(1, 4)]),
        torch.cat([mask, torch.zeros(1, 4, dtype=mask.dtype)]),
        0.2,
        aggregation="sequence_mean",
    )
    _close(padded, sequence)


def test_value_loss_takes_the_larger_of_clipped_and_unclipped_errors():
    values, old = torch.tensor([[1.0, 1.0]]), torch.tensor([[0.0, 0.0]])
    returns, mask = torch.tensor([[2.0, 0.0]]), torch.ones(1, 2)
    loss, clip_fraction = value_loss(values, old, returns, mask, clip_range=0.2)
    # token 0: (1-2)^2 = 1 vs (0.2-2)^2 = 3.24 -> clipped wins; token 1: 1 vs 0.04 -> unclipped wins
    _close(loss, 0.5 * (3.24 + 1.0) / 2)
    _close(clip_fraction, 0.5)
    loss_plain, clip_plain = value_loss(values, old, returns, mask, clip_range=None)
    _close(loss_plain, 0.5 * (1.0 + 1.0) / 2)
    _close(clip_plain, 0.0)


# --- GRPO --------------------------------------------------------------------


def test_group_advantages_normalise_each_group_and_give_zeros_for_equal_rewards():
    rewards = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0, 0.0, 10.0, 4.0])
    adv = group_advantages(rewards, group_size=3)
    _close(adv[:3], torch.tensor([-1.0, 0.0, 1.0]) / (1 + 1e-4))  # unbiased std of 1,2,3 is 1
    _close(adv[3:6], torch.zeros(3))
    groups = adv.view(3, 3)
    _close(groups.mean(dim=1), torch.zeros(3), tol=1e-6)
    _close(groups[[0, 2]].std(dim=1), torch.ones(2), tol=1e-3)
    _close(
        group_advantages(rewards, 3, scale=False), torch.tensor([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0, -14 / 3, 16 / 3, -2 / 3]), 1e-5
    )


def test_group_advantages_reject_a_batch_of_partial_groups():
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(torch.zeros(6), group_size=4)
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.zeros(6), group_size=1)
