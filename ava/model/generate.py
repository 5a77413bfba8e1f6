"""Autoregressive sampling with a KV cache: greedy, temperature, top-k, top-p.

The model is typed by what sampling uses of it (`CausalLM`), not by its class:
`ava.model.transformer` imports this module for `AvaForCausalLM.generate`, so
this one does not import it back.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from ava.config.schema.model import ModelConfig
from ava.errors import UserError
from ava.model.kv_cache import KVCache


class CausalLM(Protocol):
    """What sampling needs of a model: `AvaForCausalLM` has it."""

    config: ModelConfig
    training: bool

    def __call__(self, input_ids: torch.Tensor, *, cache: KVCache) -> Any: ...  # an output with `.logits`

    def new_cache(self, batch: int, max_length: int) -> KVCache: ...

    def eval(self) -> Any: ...

    def train(self, mode: bool = True) -> Any: ...


def filter_logits(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Set to -inf every logit outside the top-k, then outside the smallest set with mass >= top_p."""
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the tokens ranked above it already reach top_p; the best one always stays.
        remove = cumulative - sorted_logits.softmax(-1) >= top_p
        remove[..., 0] = False
        logits = logits.masked_fill(remove.scatter(-1, sorted_idx, remove), float("-inf"))
    return logits


@torch.no_grad()
def generate(model: CausalLM, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, eos_token_id: int | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Return `input_ids` followed by up to `max_new_tokens` tokens per row.

    temperature 0 is greedy decoding. Rows that emit `eos_token_id` are padded
    with it while the others continue; generation stops when every row has.
    """
    batch, prompt = input_ids.shape
    limit = model.config.max_position_embeddings
    if prompt + max_new_tokens > limit:
        raise UserError(
            f"prompt ({prompt} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
            f"model.max_position_embeddings = {limit}",
            f"ask for at most {max(limit - prompt, 0)} new tokens, or shorten the prompt")
    was_training = model.training
    model.eval()
    try:
        cache = model.new_cache(batch, prompt + max_new_tokens)
        tokens = input_ids
        finished = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
        step_input = input_ids
        for _ in range(max_new_tokens):
            logits = model(step_input, cache=cache).logits[:, -1].float()
            if temperature == 0:
                next_token = logits.argmax(-1)
            else:
                probs = filter_logits(logits / temperature, top_k, top_p).softmax(-1)
                next_token = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
            if eos_token_id is not None:
                next_token = next_token.masked_fill(finished, eos_token_id)
                finished |= next_token == eos_token_id
            tokens = torch.cat([tokens, next_token[:, None]], dim=1)
            step_input = next_token[:, None]
            if eos_token_id is not None and bool(finished.all()):
                break
        return tokens
    finally:
        model.train(was_training)
