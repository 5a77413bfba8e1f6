"""What each loss penalty does to a model: greedy samples before and after, on corpora built to invite the fault.

Each case trains the same small model twice from the same seed on the same
stream of packed documents (fresh documents every step, so the model learns
the distribution rather than memorising documents), once with the language-
model loss alone and once with one penalty added, then decodes greedily from
the start of a document:

- runs: a token is repeated with probability 0.7, so greedy decoding of the
  plain model repeats one token forever; the immediate-repetition penalty
  makes it move on.
- echoes: the next token copies the one two back with probability 0.55, else
  steps to a new one, so the plain model loops "a b a b"; the repetition
  (unlikelihood) penalty breaks the loop.
- short documents: lengths 1-16, so the end token is the single likeliest
  token from the first position and greedy samples end at once; with the
  early-end penalty every sample is at least `min_sequence_length` long.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest
import torch

from ava.config.schema import ModelConfig
from ava.model import AvaForCausalLM
from ava.model.penalties import LossPenalties, segments_from_eos

VOCAB, EOS, ROW, BATCH, STEPS = 32, 0, 64, 16, 150
MIN_LENGTH = 10

Document = Callable[[random.Random], list[int]]


def runs(rng: random.Random) -> list[int]:
    tokens, token = [], rng.randrange(1, VOCAB)
    while len(tokens) < 40:
        tokens.append(token)
        if rng.random() >= 0.7:
            token = token % (VOCAB - 1) + 1
    return tokens


def echoes(rng: random.Random) -> list[int]:
    tokens = [rng.randrange(1, VOCAB), rng.randrange(1, VOCAB)]
    while len(tokens) < 40:
        tokens.append(tokens[-2] if rng.random() < 0.55 else tokens[-1] % (VOCAB - 1) + 1)
    return tokens


def short_documents(rng: random.Random) -> list[int]:
    return [rng.randrange(1, VOCAB) for _ in range(rng.randint(1, 16))]


def _rows(document: Document, rng: random.Random) -> torch.Tensor:
    stream: list[int] = []
    while len(stream) < BATCH * ROW:
        stream += [*document(rng), EOS]
    return torch.tensor(stream[:BATCH * ROW]).view(BATCH, ROW)


def _train(document: Document, penalties: LossPenalties | None) -> AvaForCausalLM:
    torch.manual_seed(0)
    model = AvaForCausalLM(ModelConfig(hidden_size=32, num_layers=2, num_attention_heads=2, intermediate_size=64,
                                       vocab_size=VOCAB, max_position_embeddings=128, num_experts=1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = random.Random(1)
    for _ in range(STEPS):
        rows = _rows(document, rng)
        out = model(rows, labels=rows)
        loss = out.loss
        if penalties is not None:
            loss = loss + sum(penalties(out.logits, rows, rows, *segments_from_eos(rows, EOS)).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def _samples(model: AvaForCausalLM) -> list[list[int]]:
    """Greedy continuations of eight document openings (an end token, then a first token)."""
    with torch.no_grad():
        return [model.generate(torch.tensor([[EOS, 1 + 3 * i % (VOCAB - 1)]]), 30, temperature=0.0)[0, 1:].tolist()
                for i in range(8)]


def _immediate_repeats(samples: list[list[int]]) -> float:
    return sum(sum(a == b for a, b in zip(s, s[1:], strict=False)) / (len(s) - 1) for s in samples) / len(samples)


def _window_repeats(samples: list[list[int]]) -> float:
    """The share of tokens that already occurred earlier in the sample (all of it: shorter than the window)."""
    return sum(sum(s[i] in s[:i] for i in range(1, len(s))) / (len(s) - 1) for s in samples) / len(samples)


def _lengths(samples: list[list[int]]) -> list[int]:
    return [s.index(EOS) if EOS in s else len(s) for s in samples]


@pytest.fixture
def one_thread():
    """Greedy decisions from fixed seeds: one intra-op thread, so no summation order depends on the machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_the_immediate_repetition_penalty_stops_a_model_repeating_the_last_token(one_thread):
    plain = _immediate_repeats(_samples(_train(runs, None)))
    penalised = _immediate_repeats(_samples(_train(runs, LossPenalties(immediate_weight=4.0))))
    assert plain > 0.8  # the corpus invites it: the plain model mostly repeats
    assert penalised < plain - 0.5


def test_the_repetition_penalty_breaks_a_models_loops_over_earlier_tokens(one_thread):
    plain = _window_repeats(_samples(_train(echoes, None)))
    penalised = _window_repeats(_samples(_train(echoes, LossPenalties(repetition_weight=4.0, repetition_window=64))))
    assert plain > 0.8  # "a b a b ...": almost every token is an earlier one
    assert penalised < plain - 0.5


def test_the_eos_penalty_makes_every_sample_at_least_min_sequence_length_long(one_thread):
    plain = _lengths(_samples(_train(short_documents, None)))
    penalised = _lengths(_samples(_train(short_documents, LossPenalties(eos_weight=5.0, min_length=MIN_LENGTH,
                                                                         eos_id=EOS))))
    assert sorted(plain)[len(plain) // 2] < MIN_LENGTH // 2  # the plain model ends most documents early
    assert min(penalised) >= MIN_LENGTH, penalised
