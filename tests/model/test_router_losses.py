"""The router losses equal their formulas on hand-computed cases."""

from __future__ import annotations

import math

import torch

from ava.model.moe.losses import load_balancing_loss, router_z_loss
from ava.model.moe.metrics import load_cv


def test_load_balancing_loss_matches_hand_computation():
    # 2 tokens, 2 experts, k=1. Token 0 -> expert 0 (p=0.9), token 1 -> expert 0 (p=0.6).
    probs = torch.tensor([[0.9, 0.1], [0.6, 0.4]])
    load = torch.tensor([2, 0])
    # f = [1, 0], P = [0.75, 0.25] -> 2 * (1 * 0.75 + 0 * 0.25) = 1.5
    torch.testing.assert_close(load_balancing_loss(probs, load, top_k=1), torch.tensor(1.5))


def test_load_balancing_loss_is_one_for_a_perfectly_even_router_whatever_k():
    probs = torch.full((8, 4), 0.25)
    for k in (1, 2, 4):
        load = torch.full((4,), 8 * k // 4)
        torch.testing.assert_close(load_balancing_loss(probs, load, top_k=k), torch.tensor(1.0))


def test_load_balancing_gradient_flows_through_probabilities_only():
    logits = torch.randn(6, 3, requires_grad=True)
    loss = load_balancing_loss(torch.softmax(logits, -1), torch.tensor([4, 1, 1]), top_k=1)
    loss.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_z_loss_matches_hand_computation():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    # logsumexp: log 2 and log 4 -> mean of squares
    expected = (math.log(2.0) ** 2 + math.log(4.0) ** 2) / 2
    torch.testing.assert_close(router_z_loss(logits), torch.tensor(expected))


def test_load_cv_is_zero_when_even_and_sqrt_e_minus_1_when_collapsed():
    torch.testing.assert_close(load_cv(torch.tensor([5.0, 5.0, 5.0, 5.0])), torch.tensor(0.0))
    torch.testing.assert_close(load_cv(torch.tensor([20.0, 0.0, 0.0, 0.0])), torch.tensor(math.sqrt(3.0)))
