"""The loss penalties (`ava.model.penalties`) against a hand computation, position by position.

Each reference below walks the positions of a row in plain Python and sums
-log(1 - p) over the candidates the docstring of `ava.model.penalties`
defines, so a mistake in the vectorised masks (window, document, duplicates,
the true next token, the known start, the prompt) shows as a mismatch.
"""

from __future__ import annotations

import math

import pytest
import torch

from ava.config.schema import TrainingConfig
from ava.errors import UserError
from ava.model.penalties import LossPenalties, segments_from_eos
from ava.model.transformer import IGNORE_INDEX

EOS = 0
# Two rows of packed documents (0 ends a document): the first row opens inside a document, repeats
# tokens within and across its documents, and ends in the middle of one.
IDS = torch.tensor([[5, 3, 5, 5, 0, 3, 4, 3, 3, 0, 2, 2],
                    [1, 0, 4, 4, 1, 4, 2, 0, 0, 6, 6, 1]])


def _logits(seed: int = 0, vocab: int = 7) -> torch.Tensor:
    return torch.randn(*IDS.shape, vocab, generator=torch.Generator().manual_seed(seed)) * 2


def _unlikely(p: float) -> float:
    return -math.log(max(1.0 - p, 1e-5))


def _reference(logits, ids, labels, segments, known, *, window=0, repetition=0.0, immediate=0.0, eos=0.0,
               min_length=0) -> dict[str, float]:
    """The three terms, one position at a time."""
    probs = logits.softmax(-1)
    rows, seq = ids.shape
    count = sum(1 for b in range(rows) for t in range(seq - 1) if labels[b, t + 1] != IGNORE_INDEX)
    sums = {"repetition_loss": 0.0, "immediate_repetition_loss": 0.0, "eos_loss": 0.0}
    for b in range(rows):
        for t in range(seq - 1):
            target = int(labels[b, t + 1])
            if target == IGNORE_INDEX or segments[b, t + 1] != segments[b, t]:
                continue
            p = probs[b, t]
            seen = {int(ids[b, j]) for j in range(max(0, t - window + 1), t + 1) if segments[b, j] == segments[b, t]}
            sums["repetition_loss"] += sum(_unlikely(float(p[c])) for c in seen - {target})
            if target != int(ids[b, t]):
                sums["immediate_repetition_loss"] += _unlikely(float(p[ids[b, t]]))
            produced = sum(1 for j in range(t + 1) if segments[b, j] == segments[b, t] and labels[b, j] != IGNORE_INDEX)
            if known[b, t] and produced < min_length and target != EOS:
                sums["eos_loss"] += _unlikely(float(p[EOS]))
    weights = {"repetition_loss": repetition, "immediate_repetition_loss": immediate, "eos_loss": eos}
    return {name: weights[name] * total / count for name, total in sums.items() if weights[name] > 0}


def _check(penalties: LossPenalties, logits, labels, segments, known, **weights) -> None:
    got = {name: float(value) for name, value in penalties(logits, IDS, labels, segments, known).items()}
    want = _reference(logits, IDS, labels, segments, known, **weights)
    assert set(got) == set(want) == set(penalties.names)
    for name in want:
        assert got[name] == pytest.approx(want[name], rel=1e-5), name


def test_packed_rows_split_into_documents_at_the_end_token_and_only_later_documents_have_a_known_start():
    segments, known = segments_from_eos(IDS, EOS)
    assert segments[0].tolist() == [0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 2, 2]  # the end token closes its own document
    assert known[0].tolist() == [False] * 5 + [True] * 7
    assert segments[1].tolist() == [0, 0, 1, 1, 1, 1, 1, 1, 2, 3, 3, 3]
    none, unknown = segments_from_eos(IDS, None)
    assert none.eq(0).all() and not unknown.any()


@pytest.mark.parametrize("window", [1, 3, 64])
def test_repetition_penalty_is_the_unlikelihood_of_each_distinct_earlier_token_of_the_window_and_document(window):
    segments, known = segments_from_eos(IDS, EOS)
    penalties = LossPenalties(repetition_weight=0.5, repetition_window=window)
    _check(penalties, _logits(), IDS, segments, known, window=window, repetition=0.5)


def test_immediate_repetition_penalty_pushes_down_the_current_token_where_the_next_is_not_a_repeat():
    segments, known = segments_from_eos(IDS, EOS)
    _check(LossPenalties(immediate_weight=1.5), _logits(1), IDS, segments, known, immediate=1.5)


def test_eos_penalty_applies_before_min_length_in_documents_with_a_known_start_and_never_on_a_true_end():
    segments, known = segments_from_eos(IDS, EOS)
    penalties = LossPenalties(eos_weight=5.0, min_length=3, eos_id=EOS)
    _check(penalties, _logits(2), IDS, segments, known, eos=5.0, min_length=3)
    # By hand for row 1's second document [4 4 1 4 2 0]: lengths 1..5 at its positions 2..6; below 3 are
    # positions 2 and 3 (next tokens 4 and 1, not the end). Row 0's first document is of unknown length.
    probs = _logits(2).softmax(-1)
    # Row 0's second document [3 4 3 3 0]: positions 5, 6 have lengths 1, 2; its third [2 2] starts at 10.
    row0 = [(0, 5), (0, 6), (0, 10)]
    by_hand = sum(_unlikely(float(probs[b, t, EOS])) for b, t in [*row0, (1, 2), (1, 3)])
    # row 1's fourth document [6 6 1] starts at 9: positions 9 and 10 (the row's last position has no next token)
    by_hand += sum(_unlikely(float(probs[1, t, EOS])) for t in (9, 10))
    got = penalties(_logits(2), IDS, IDS, segments, known)["eos_loss"]
    assert float(got) == pytest.approx(5.0 * by_hand / (2 * 11), rel=1e-5)


def test_all_three_together_are_the_sum_of_each_alone():
    segments, known = segments_from_eos(IDS, EOS)
    both = LossPenalties(repetition_weight=0.5, repetition_window=4, immediate_weight=1.0, eos_weight=5.0,
                         min_length=4, eos_id=EOS)
    _check(both, _logits(3), IDS, segments, known, window=4, repetition=0.5, immediate=1.0, eos=5.0, min_length=4)


def test_sft_rows_penalise_the_response_only_and_count_its_length_from_the_response_start():
    # Two examples packed in each row: prompt tokens carry no label (-100), as ava.rlhf.data.sft_rows makes them.
    labels = IDS.clone()
    segments = torch.tensor([[0] * 6 + [1] * 6, [0] * 5 + [1] * 7])
    prompt = torch.tensor([[1, 1, 1, 0, 0, 0, 1, 1, 0, 0, 0, 0], [1, 1, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    labels[prompt] = IGNORE_INDEX
    known = torch.ones_like(IDS, dtype=torch.bool)
    penalties = LossPenalties(repetition_weight=0.5, repetition_window=8, immediate_weight=1.0, eos_weight=2.0,
                              min_length=2, eos_id=EOS)
    _check(penalties, _logits(4), labels, segments, known, window=8, repetition=0.5, immediate=1.0, eos=2.0,
           min_length=2)


def test_a_certain_wrong_token_gives_a_large_finite_penalty_and_a_gradient():
    segments, known = segments_from_eos(IDS, EOS)
    logits = torch.full((*IDS.shape, 7), -30.0)
    logits.scatter_(-1, IDS.unsqueeze(-1), 30.0)  # p = 1 on repeating the current token, everywhere
    logits.requires_grad_(True)
    term = LossPenalties(immediate_weight=1.0)(logits, IDS, IDS, segments, known)["immediate_repetition_loss"]
    assert math.isfinite(float(term.detach())) and float(term.detach()) > 5
    term.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def test_training_step_on_the_penalty_lowers_the_probability_it_penalises():
    segments, known = segments_from_eos(IDS, EOS)
    logits = _logits(5).requires_grad_(True)
    penalties = LossPenalties(immediate_weight=1.0)
    before = penalties(logits, IDS, IDS, segments, known)["immediate_repetition_loss"]
    before.backward()
    with torch.no_grad():
        after = penalties(logits - 0.5 * logits.grad, IDS, IDS, segments, known)["immediate_repetition_loss"]
    assert float(after) < float(before.detach())


def test_zero_weights_mean_no_penalty_object_so_the_loss_is_the_models_own():
    assert LossPenalties.from_training(TrainingConfig(), EOS) is None  # the schema's defaults are off
    off = TrainingConfig(repetition_penalty_weight=0.0, immediate_repetition_weight=0.0, eos_penalty_weight=0.0,
                         min_sequence_length=20)
    assert LossPenalties.from_training(off, EOS) is None
    guide = TrainingConfig(repetition_penalty_weight=0.5, immediate_repetition_weight=1.0, min_sequence_length=20,
                           eos_penalty_weight=5.0)
    on = LossPenalties.from_training(guide, EOS)
    assert on is not None and on.names == ["repetition_loss", "immediate_repetition_loss", "eos_loss"]
    assert (on.repetition_window, on.min_length, on.eos_id) == (64, 20, EOS)


def test_an_eos_penalty_on_data_without_an_end_token_is_a_user_error_naming_the_fix():
    with pytest.raises(UserError) as caught:
        LossPenalties.from_training(TrainingConfig(eos_penalty_weight=1.0, min_sequence_length=5), None)
    assert "data.eos_token_id" in caught.value.fix
