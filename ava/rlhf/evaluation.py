"""Held-out evaluation of a policy: greedy answers to held-out prompts, scored by the stage's reward.

Every rank evaluates the same prompts (greedy decoding is deterministic), so
the numbers need no reduction and every rank runs the same collectives under
ZeRO-3.
"""

from __future__ import annotations

import torch

from ava.config.schema.rlhf import GenerationConfig
from ava.data.tokenizer import Tokenizer
from ava.rlhf.data import Prompt
from ava.rlhf.engines import RoleEngine, generation_module
from ava.rlhf.rewards import Scorer
from ava.rlhf.rollout import sample_responses

SHOWN_SAMPLES = 3
EVAL_CHUNK = 64  # prompts per generate call: bounds the KV cache on long evaluations


@torch.no_grad()
def evaluate_prompts(actor: RoleEngine, prompts: list[Prompt], tokenizer: Tokenizer, generation: GenerationConfig,
                     scorer: Scorer | None) -> dict:
    """`eval_reward` (mean score of greedy answers), `eval_exact` (share scoring 1.0), lengths and a few samples.

    No reward is reported when the scorer compares with reference answers and
    some held-out prompt has none.
    """
    if not prompts:
        return {}
    was_training = actor.engine.training
    actor.engine.eval()
    responses: list[str] = []
    lengths: list[float] = []
    generator = torch.Generator(device=actor.device)
    with generation_module(actor) as module:
        for start in range(0, len(prompts), EVAL_CHUNK):
            chunk = prompts[start:start + EVAL_CHUNK]
            rollout = sample_responses(module, chunk, tokenizer, generation, generator, actor.device, greedy=True)
            responses += rollout.responses
            lengths += rollout.response_lengths.tolist()
    actor.engine.train(was_training)
    out: dict = {"eval_response_length": sum(lengths) / len(lengths)}
    samples: list[dict[str, str | float]] = [
        {"prompt": p.text, "response": r} for p, r in zip(prompts[:SHOWN_SAMPLES], responses, strict=False)]
    if scorer is not None and not (scorer.needs_answers and any(p.answer is None for p in prompts)):
        scores = scorer([p.text for p in prompts], responses, [p.answer for p in prompts])
        out["eval_reward"] = sum(scores) / len(scores)
        out["eval_exact"] = sum(s >= 1.0 for s in scores) / len(scores)
        for sample, score in zip(samples, scores, strict=False):
            sample["reward"] = score
    out["eval_samples"] = samples
    return out
