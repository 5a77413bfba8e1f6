"""The tensor maths of RLHF: masked statistics, log-probs, and the reward-model, DPO, PPO and GRPO losses.

Pure functions of tensors: no model, no DeepSpeed. A `mask` is bool or 0/1
float of the same shape as the values it selects (response tokens, say);
masked-out positions never leak into a result, even when they hold inf/NaN.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F

# Bounds on log(ref/pi) in the k3 estimator: see kl_penalty.
_K3_LOG_RATIO_BOUND = 20.0


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of x where mask is true (over `dim`, or everything)."""
    # where(), not x * mask: padding may hold inf or NaN, and inf * 0 is NaN.
    picked = torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))
    return picked.sum() if dim is None else picked.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x where mask is true; 0 (not NaN) where the mask selects nothing."""
    count = mask.bool().sum() if dim is None else mask.bool().sum(dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1).to(x.dtype)


def masked_whiten(
    x: torch.Tensor,
    mask: torch.Tensor,
    shift_mean: bool = True,
    eps: float = 1e-8,
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """(x - mean) / std over the masked elements; masked-out positions are 0.

    The variance is unbiased (n - 1), as in TRL. With `all_reduce` (sums a
    tensor over the data-parallel ranks and returns it), mean and variance are
    those of every rank's elements together, so advantages are normalised the
    same way whatever the number of ranks; (sum, sum of squares, count) go in
    one stacked call. The stats are float64 so the sum-of-squares form does
    not lose the variance to cancellation; one element gives variance 0, not
    a division by zero. Mean and std are constants to autograd (a collective
    has no backward). `shift_mean=False` rescales but keeps the mean.
    """
    keep = mask.bool()
    x64 = torch.where(keep, x.detach().double(), torch.zeros((), dtype=torch.float64, device=x.device))
    stats = torch.stack([x64.sum(), x64.square().sum(), keep.sum().double()])
    if all_reduce is not None:
        stats = all_reduce(stats)
    total, total_sq, count = stats.unbind()
    mean = total / count.clamp(min=1)
    var = ((total_sq - count * mean.square()) / (count - 1).clamp(min=1)).clamp(min=0)
    mean, var = mean.to(x.dtype), var.to(x.dtype)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(keep, whitened, torch.zeros((), dtype=whitened.dtype, device=x.device))


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """log p(input_ids[:, t+1] | logits[:, t]) in float32: logits (B, T, V), input_ids (B, T) -> (B, T-1).

    logsumexp-based: logit[target] - logsumexp(logits), so no (B, T, V)
    log_softmax output is kept. Logits that are not float32 (bf16, fp16) are
    cast one row at a time: without autograd the extra memory is one row's
    (T, V) in float32, not the batch's (as TRL's selective_log_softmax does).
    """
    targets = input_ids[:, 1:].unsqueeze(-1)
    if logits.dtype == torch.float32:
        shifted = logits[:, :-1]
        return shifted.gather(-1, targets).squeeze(-1) - torch.logsumexp(shifted, dim=-1)
    rows = []
    for row_logits, row_targets in zip(logits[:, :-1], targets, strict=True):
        row = row_logits.float()
        rows.append(row.gather(-1, row_targets).squeeze(-1) - torch.logsumexp(row, dim=-1))
    return torch.stack(rows)


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the predictive distribution at positions 0..T-2, in float32: (B, T, V) -> (B, T-1).

    H = logsumexp(z) - sum softmax(z) * z, one row at a time like token_logprobs.
    """
    rows = []
    for row_logits in logits[:, :-1]:
        z = row_logits.float()
        rows.append(torch.logsumexp(z, dim=-1) - (torch.softmax(z, dim=-1) * z).sum(-1))
    return torch.stack(rows)


def pairwise_reward_loss(
    chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | float | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bradley-Terry loss -logsigmoid(chosen - rejected - margin).mean() -> (loss, accuracy, mean margin).

    accuracy is the fraction of pairs with chosen > rejected, the mean margin
    that of chosen - rejected; both are detached statistics.
    """
    diff = chosen - rejected
    logits = diff if margin is None else diff - margin
    loss = -F.logsigmoid(logits).mean()
    accuracy = (chosen > rejected).float().mean().detach()
    return loss, accuracy, diff.detach().mean()


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair preference losses from sequence log-probs (B,) -> (losses, chosen_rewards, rejected_rewards).

    logits = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected).
    sigmoid (DPO, Rafailov et al. 2023): -logsigmoid(beta*logits)*(1-ls) - logsigmoid(-beta*logits)*ls,
    the conservative DPO of a label flipped with probability ls.
    ipo (Azar et al. 2023): (logits - 1/(2*beta))^2. IPO's regression target
    assumes length-averaged log-probs (summed ones make 1/(2*beta) tiny next
    to the logits); the caller decides which it passes.
    The rewards are beta * (policy - ref), detached: implicit rewards to log.
    """
    logits = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * logits) * (1 - label_smoothing) - F.logsigmoid(-beta * logits) * label_smoothing
    elif loss_type == "ipo":
        if label_smoothing:
            raise ValueError(
                f"dpo_loss: label_smoothing={label_smoothing} applies to loss_type 'sigmoid' only; set it to 0 for 'ipo'"
            )
        losses = (logits - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"dpo_loss: unknown loss_type {loss_type!r}; use 'sigmoid' or 'ipo'")
    chosen_rewards = beta * (policy_chosen - ref_chosen).detach()
    rejected_rewards = beta * (policy_rejected - ref_rejected).detach()
    return losses, chosen_rewards, rejected_rewards


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: Literal["k1", "k2", "k3"]) -> torch.Tensor:
    """Per-token estimate of KL(pi || ref) from tokens sampled from pi (Schulman, "Approximating KL divergence").

    k1 = logp - ref: unbiased, high variance, can be negative.
    k2 = 0.5 * (logp - ref)^2: biased, low variance, >= 0.
    k3 = exp(ref - logp) - (ref - logp) - 1: unbiased and >= 0. Written as
    expm1(r) - r (r = ref - logp) so that small r does not round to a negative
    value. Beyond r = 20 it continues as its tangent line at 20: exp(r)
    overflows float32 beyond ~88 (half precision much sooner), and one token
    the policy finds far less likely than the reference would otherwise give
    an inf penalty; the tangent keeps value and gradient finite, increasing
    and pointing back towards the reference. For r < 0 it is exact (about -r).
    """
    log_ratio = logp - ref_logp
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.square()
    if estimator == "k3":
        r = -log_ratio
        bounded = r.clamp(max=_K3_LOG_RATIO_BOUND)
        beyond = (r - _K3_LOG_RATIO_BOUND).clamp(min=0)  # the tangent's run past the bound
        return (torch.expm1(bounded) - bounded + beyond * math.expm1(_K3_LOG_RATIO_BOUND)).clamp(min=0)
    raise ValueError(f"kl_penalty: unknown estimator {estimator!r}; use 'k1', 'k2' or 'k3'")


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016) over (B, T) -> (advantages, returns).

    Each row's episode is its masked span (response tokens); the value after
    its last valid token is 0 (the episode ends there). Outputs are 0 at
    masked positions and returns = advantages + values. Advantages and returns
    are targets, so nothing here is differentiated. One vectorised step per
    position, walking back from T-1.
    """
    keep = mask.bool()
    with torch.no_grad():
        zero = torch.zeros_like(values[:, 0])
        next_value, running = zero, zero
        advantages = []
        for t in reversed(range(rewards.shape[1])):
            delta = rewards[:, t] + gamma * next_value - values[:, t]
            running = torch.where(keep[:, t], delta + gamma * lam * running, zero)
            next_value = torch.where(keep[:, t], values[:, t], zero)
            advantages.append(running)
        adv = torch.stack(advantages[::-1], dim=1)
        returns = torch.where(keep, adv + values, torch.zeros_like(adv))
    return adv, returns


def ppo_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
    aggregation: Literal["token_mean", "sequence_mean"] = "token_mean",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO clipped surrogate (Schulman et al. 2017) over (B, T) tokens -> (loss, clip_fraction, approx_kl).

    Per token max(-A*ratio, -A*clip(ratio, 1-c, 1+c)), ratio = exp(logp - old).
    token_mean averages over all masked tokens; sequence_mean averages each
    row's masked mean over the rows that have tokens (original GRPO), so every
    sequence weighs the same whatever its length. clip_fraction (tokens where
    the clipped branch is active, hence no gradient) and approx_kl
    (0.5*(logp - old)^2) are detached masked means over tokens.
    """
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_range, 1 + clip_range)
    loss = aggregate_tokens(torch.maximum(unclipped, clipped), mask, aggregation)
    clip_fraction = masked_mean((clipped > unclipped).float(), mask).detach()
    approx_kl = masked_mean(0.5 * log_ratio.detach().square(), mask)
    return loss, clip_fraction, approx_kl


def aggregate_tokens(
    per_token: torch.Tensor, mask: torch.Tensor, aggregation: Literal["token_mean", "sequence_mean"]
) -> torch.Tensor:
    """Mean over every masked token (token_mean), or the mean of each row's masked mean over rows with tokens."""
    if aggregation == "token_mean":
        return masked_mean(per_token, mask)
    if aggregation == "sequence_mean":
        has_tokens = mask.bool().any(dim=1)
        return masked_mean(masked_mean(per_token, mask, dim=1), has_tokens)
    raise ValueError(f"unknown aggregation {aggregation!r}; use 'token_mean' or 'sequence_mean'")


def value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip_range: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """0.5 * masked mean of max((v - R)^2, (old + clip(v - old, -c, c) - R)^2) -> (loss, clip_fraction).

    The clipped term keeps the value head from moving more than c from the
    values the rollout saw; clip_range None is the plain squared error.
    clip_fraction (detached) is the share of tokens where the clipped term wins.
    """
    unclipped = (values - returns).square()
    if clip_range is None:
        return 0.5 * masked_mean(unclipped, mask), torch.zeros((), device=values.device)
    clipped_values = old_values + (values - old_values).clamp(-clip_range, clip_range)
    clipped = (clipped_values - returns).square()
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask)
    return loss, masked_mean((clipped > unclipped).float(), mask).detach()


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """GRPO advantages (Shao et al. 2024): each reward relative to its group's, (N,) -> (N,).

    Rows come in consecutive groups of `group_size` completions of one prompt.
    (r - group mean) / (group std + eps) when `scale`, else r - group mean; the
    std is unbiased (torch.std), as in the GRPO paper and TRL. A group of
    equal rewards gives zeros (no signal), not NaN.
    """
    if group_size < 2:
        raise ValueError(f"group_advantages: group_size={group_size}; GRPO compares completions of one prompt, so it needs >= 2")
    if rewards.numel() % group_size:
        raise ValueError(
            f"group_advantages: {rewards.numel()} rewards do not split into groups of {group_size}; "
            "the batch must hold whole groups (a multiple of group_size completions)"
        )
    groups = rewards.reshape(-1, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if scale:
        centred = centred / (groups.std(dim=1, keepdim=True) + eps)
    return centred.reshape(-1)
