"""Text in, text out: a prompt through a trained model's tokenizer and `ava.model.generate`, back to text.

The token-level loop (KV cache, greedy / temperature / top-k / top-p) is
`ava.model.generate.generate`; this module only adds what text needs: the
prompt checked against the model's context before any work, the model's
end-of-document id as the stop token, a seeded generator, and decoding.

Samples are drawn one after another from one generator seeded once, so with
the same seed the first of `num_samples` samples is the sample a single draw
gives, and every sample is the same on a rerun (on the same device and dtype).

The end-of-run sample in summary.json is greedy, does not stop at the
end-of-document id, and asks for `training.sample_max_new_tokens` tokens (at
most what the context leaves); the same settings here (temperature 0,
`stop_at_eos=False`) continue the same prompt ids with the same tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ava.data.tokenizer import Tokenizer
from ava.errors import UserError
from ava.model.generate import generate
from ava.model.transformer import AvaForCausalLM


@dataclass(frozen=True)
class Sampling:
    """How to continue a prompt; the field names are `ava generate`'s options."""

    max_new_tokens: int = 64
    temperature: float = 0.8  # 0 is greedy decoding
    top_k: int | None = None
    top_p: float | None = None
    num_samples: int = 1
    seed: int | None = None  # None: fresh randomness on every call
    stop_at_eos: bool = True

    def check(self) -> None:
        """Refuse values that cannot be meant, naming the option and a value that works."""
        if self.max_new_tokens < 1:
            raise UserError(f"--max_new_tokens {self.max_new_tokens} asks for no text", "pass a value of 1 or more")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise UserError(f"--temperature {self.temperature} is not a temperature",
                            "pass 0 for greedy decoding or a positive value (1.0 samples the model's own distribution)")
        if self.top_k is not None and self.top_k < 1:
            raise UserError(f"--top_k {self.top_k} keeps no token", "pass 1 or more, or leave --top_k out")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise UserError(f"--top_p {self.top_p} is outside (0, 1]", "pass a value such as 0.9, or leave --top_p out")
        if self.num_samples < 1:
            raise UserError(f"--num_samples {self.num_samples} asks for no sample", "pass 1 or more")
        if self.temperature == 0:
            ignored = [name for name, value in (("--top_k", self.top_k), ("--top_p", self.top_p)) if value is not None]
            if ignored:
                one = len(ignored) == 1
                raise UserError(f"{' and '.join(ignored)} {'has' if one else 'have'} no effect with --temperature 0 "
                                "(greedy decoding always takes the most likely token)",
                                f"drop {'it' if one else 'them'}, or pass a temperature above 0 to sample")
            if self.num_samples > 1:
                raise UserError(f"--num_samples {self.num_samples} with --temperature 0: greedy decoding gives the "
                                "same text every time",
                                "pass a temperature above 0 to draw different samples, or drop --num_samples")


@dataclass(frozen=True)
class Sample:
    """One continuation: the ids and their text (an end-of-document id that stopped it is left out of both)."""

    prompt_ids: list[int]
    continuation_ids: list[int]
    continuation: str


def encode_prompt(tokenizer: Tokenizer, prompt: str, max_new_tokens: int, context: int) -> list[int]:
    """The prompt's ids, checked to leave room for `max_new_tokens` in a context of `context` positions."""
    ids = tokenizer.encode(prompt)
    if not ids:
        raise UserError("the prompt is empty: there is nothing to continue",
                        "pass --prompt TEXT, or pipe the text on stdin")
    if len(ids) + max_new_tokens > context:
        room = context - len(ids)
        fix = (f"lower --max_new_tokens to {room} or less, or shorten the prompt" if room > 0
               else f"shorten the prompt to fewer than {context} tokens (keep its end: the model reads left to right)")
        raise UserError(f"the prompt is {len(ids)} tokens and --max_new_tokens is {max_new_tokens}: "
                        f"{len(ids) + max_new_tokens} exceeds the model's context of {context} tokens "
                        "(model.max_position_embeddings)", fix)
    return ids


def generate_text(model: AvaForCausalLM, tokenizer: Tokenizer, prompt: str, sampling: Sampling,
                  eos_id: int | None = None) -> list[Sample]:
    """`sampling.num_samples` continuations of `prompt`, on the model's device and in its dtype.

    `eos_id` ends a sample (with `sampling.stop_at_eos`): the model's recorded
    one, which for an imported model may differ from what the tokenizer's
    token names suggest; None falls back to the tokenizer's.
    """
    sampling.check()
    ids = encode_prompt(tokenizer, prompt, sampling.max_new_tokens, model.config.max_position_embeddings)
    device = model.embed_tokens.weight.device
    generator = torch.Generator(device=device)
    if sampling.seed is None:
        generator.seed()
    else:
        generator.manual_seed(sampling.seed)
    eos = (tokenizer.eos_id if eos_id is None else eos_id) if sampling.stop_at_eos else None
    prompt_ids = torch.tensor([ids], dtype=torch.long, device=device)
    samples = []
    for _ in range(sampling.num_samples):
        out = generate(model, prompt_ids, sampling.max_new_tokens, temperature=sampling.temperature,
                       top_k=sampling.top_k, top_p=sampling.top_p, eos_token_id=eos, generator=generator)
        continuation = out[0, len(ids):].tolist()
        if eos is not None and continuation and continuation[-1] == eos:
            continuation.pop()  # the stop marker, not text: a file tokenizer would print it as "<|endoftext|>"
        samples.append(Sample(ids, continuation, tokenizer.decode(continuation)))
    return samples
