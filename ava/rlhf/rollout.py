"""Rollouts: sample responses with the KV-cache `generate()`, then score them with each model of the stage.

Prompts of one length are sampled together, so nothing is padded on the
left and the model needs no attention mask; sequences are then padded on
the right, which a causal model never looks at. Response tokens run up to
and including the first eos (or `max_new_tokens`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ava.config.schema.rlhf import GenerationConfig
from ava.data.tokenizer import Tokenizer
from ava.errors import UserError
from ava.model import AvaForCausalLM
from ava.rlhf.data import Prompt, SequenceBatch, sequence_batch
from ava.rlhf.engines import RoleEngine, generation_module
from ava.rlhf.losses import token_entropy, token_logprobs
from ava.rlhf.rewards import Scorer


@dataclass
class Rollout:
    prompts: list[Prompt]
    responses: list[str]  # decoded, without the eos
    batch: SequenceBatch
    response_lengths: torch.Tensor  # (B,) tokens generated, eos included
    ended: torch.Tensor  # (B,) bool: the response ended with eos (not cut at max_new_tokens)


def sample_responses(model: AvaForCausalLM, prompts: list[Prompt], tokenizer: Tokenizer, gen: GenerationConfig,
                     generator: torch.Generator, device: torch.device, greedy: bool = False) -> Rollout:
    """Sample one response per prompt (temperature 0 when `greedy`)."""
    eos = tokenizer.eos_id
    encoded = [tokenizer.encode(p.text) for p in prompts]
    limit = model.config.max_position_embeddings
    longest = max(len(ids) for ids in encoded)
    if longest + gen.max_new_tokens > limit:
        raise UserError(
            f"a prompt of {longest} tokens plus rlhf.generation.max_new_tokens = {gen.max_new_tokens} exceeds "
            f"model.max_position_embeddings = {limit}",
            f"lower max_new_tokens to {max(limit - longest, 1)} or shorten the prompts")
    by_length: dict[int, list[int]] = {}
    for i, ids in enumerate(encoded):
        by_length.setdefault(len(ids), []).append(i)
    responses: list[list[int]] = [[] for _ in prompts]
    for length, rows in by_length.items():
        batch = torch.tensor([encoded[i] for i in rows], dtype=torch.long, device=device)
        out = model.generate(batch, gen.max_new_tokens, temperature=0.0 if greedy else gen.temperature,
                             top_k=gen.top_k, top_p=gen.top_p, eos_token_id=eos, generator=generator)
        for row, tokens in zip(rows, out[:, length:].tolist(), strict=True):
            responses[row] = tokens[:tokens.index(eos) + 1] if eos in tokens else tokens
    sequences = [(p + r, len(p)) for p, r in zip(encoded, responses, strict=True)]
    return Rollout(
        prompts=prompts,
        responses=[tokenizer.decode([t for t in r if t != eos]) for r in responses],
        batch=sequence_batch(sequences, pad_id=eos).to(device),
        response_lengths=torch.tensor([float(len(r)) for r in responses], device=device),
        ended=torch.tensor([bool(r) and r[-1] == eos for r in responses], device=device))


def sample_rollout(actor: RoleEngine, prompts: list[Prompt], tokenizer: Tokenizer, gen: GenerationConfig,
                   generator: torch.Generator) -> Rollout:
    """One rollout of a PPO/GRPO step: the actor in eval mode samples, its weights whole for the whole rollout."""
    actor.engine.eval()
    with generation_module(actor) as module:
        return sample_responses(module, prompts, tokenizer, gen, generator, actor.device)


def scored(scorer: Scorer, rollout: Rollout) -> torch.Tensor:
    """The rollout's responses scored by a reward function (or a task), as a float32 tensor on its device."""
    values = scorer([p.text for p in rollout.prompts], rollout.responses, [p.answer for p in rollout.prompts])
    return torch.tensor(values, dtype=torch.float32, device=rollout.batch.input_ids.device)


def rollout_stats(rollout: Rollout, scores: torch.Tensor, kl_per_sequence: torch.Tensor,
                  sum_over_ranks: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, float]:
    """Global (all-rank) reward mean/std, KL per sequence, response length and eos share of one rollout."""
    n = float(len(scores))
    sums = sum_over_ranks(torch.tensor([
        float(scores.sum()), float(scores.square().sum()), n, float(kl_per_sequence.sum()),
        float(rollout.response_lengths.sum()), float(rollout.ended.float().sum())], dtype=torch.float64,
        device=scores.device)).tolist()
    total, total_sq, count, kl, length, ended = sums
    mean = total / count
    return {"reward": mean, "reward_std": max(total_sq / count - mean * mean, 0.0) ** 0.5, "kl": kl / count,
            "response_length": length / count, "ended_with_eos": ended / count}


def policy_logprobs(role: RoleEngine, input_ids: torch.Tensor, entropy: bool = False, entropy_grad: bool = False,
                    temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Per-token log-probs (B, T-1) of `input_ids` under the policy, its entropy if asked, and the router loss.

    With `temperature` the distribution is the one rollouts were sampled from
    (logits / T), so PPO's ratios and the KL compare the sampling policy (as
    TRL does). The entropy carries gradient only with `entropy_grad`.
    """
    out = role.forward(input_ids)
    logits = out.logits if temperature == 1.0 else out.logits / temperature
    logp = token_logprobs(logits, input_ids)
    ent = token_entropy(logits if entropy_grad else logits.detach()) if entropy else None
    return logp, ent, out.router_loss


def token_values(role: RoleEngine, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A value model's output at positions 0..T-2, aligned with the tokens they precede, and the router loss."""
    out = role.forward(input_ids)
    return out.values[:, :-1], out.router_loss


def sequence_scores(role: RoleEngine, batch: SequenceBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A reward model's score of each sequence: its value at the sequence's last token (the eos)."""
    out = role.forward(batch.input_ids)
    return out.values.gather(1, batch.last_index[:, None]).squeeze(1), out.router_loss
