"""Deterministic, sharded, resumable batches over packed sequences."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ava.data.batches import SequenceBatches
from ava.errors import UserError

LENGTH = 5


def _sequences(n: int) -> np.ndarray:
    """Row i is filled with i, so a batch tells which sequences it holds."""
    return np.repeat(np.arange(n, dtype=np.uint16)[:, None], LENGTH, axis=1)


def _ids(batch: torch.Tensor) -> list[int]:
    return batch[:, 0].tolist()


def _take(batches: SequenceBatches, count: int) -> list[list[int]]:
    """The next `count` batches, looping over epochs as a trainer does."""
    out: list[list[int]] = []
    while len(out) < count:
        for batch in batches:
            out.append(_ids(batch))
            if len(out) == count:
                break
    return out


def test_batches_are_long_tensors_of_micro_batch_rows() -> None:
    batches = SequenceBatches(_sequences(20), micro_batch=4, rank=0, world_size=1, seed=0, reshuffle_each_epoch=True)
    got = list(batches)
    assert len(got) == batches.batches_per_epoch == 5
    assert all(b.dtype == torch.long and b.shape == (4, LENGTH) for b in got)
    assert sorted(i for b in got for i in _ids(b)) == list(range(20))  # one epoch: each sequence once


@pytest.mark.parametrize("stop_after", [0, 1, 3, 4, 5, 9])  # 4 = exactly one epoch
def test_resumed_iteration_yields_the_same_batches_as_uninterrupted(stop_after: int) -> None:
    def make() -> SequenceBatches:
        return SequenceBatches(_sequences(37), micro_batch=3, rank=1, world_size=3, seed=11, reshuffle_each_epoch=True)

    assert make().batches_per_epoch == 4
    uninterrupted = _take(make(), 14)
    first = make()
    before = _take(first, stop_after)
    resumed = make()
    resumed.load_state_dict(first.state_dict())
    assert before + _take(resumed, 14 - stop_after) == uninterrupted


def test_ranks_never_share_a_sequence_within_an_epoch() -> None:
    world = 3
    per_rank = [
        [i for b in SequenceBatches(_sequences(50), micro_batch=4, rank=r, world_size=world, seed=2,
                                    reshuffle_each_epoch=True) for i in _ids(b)]
        for r in range(world)
    ]
    assert all(len(ids) == 4 * 4 for ids in per_rank)  # 50 // (4*3) = 4 batches each, equal on every rank
    seen = [i for ids in per_rank for i in ids]
    assert len(seen) == len(set(seen)) == 48


def test_order_is_reshuffled_each_epoch_only_when_asked() -> None:
    def epochs(reshuffle: bool) -> list[list[list[int]]]:
        batches = SequenceBatches(_sequences(24), micro_batch=4, rank=0, world_size=2, seed=5,
                                  reshuffle_each_epoch=reshuffle)
        return [[_ids(b) for b in batches] for _ in range(3)]

    fixed = epochs(False)
    assert fixed[0] == fixed[1] == fixed[2]
    shuffled = epochs(True)
    assert shuffled[0] != shuffled[1] and shuffled[1] != shuffled[2]
    assert shuffled == epochs(True)  # deterministic: a function of the seed and the epoch


def test_different_seeds_give_different_orders() -> None:
    def first_epoch(seed: int) -> list[list[int]]:
        return [_ids(b) for b in SequenceBatches(_sequences(40), 4, 0, 1, seed=seed, reshuffle_each_epoch=True)]

    assert first_epoch(0) != first_epoch(1)


def test_without_drop_last_every_sequence_is_seen_and_ranks_stay_in_step() -> None:
    per_rank = [
        [i for b in SequenceBatches(_sequences(26), micro_batch=4, rank=r, world_size=2, seed=0,
                                    reshuffle_each_epoch=True, drop_last=False) for i in _ids(b)]
        for r in range(2)
    ]
    assert len(per_rank[0]) == len(per_rank[1]) == 4 * 4  # ceil(26 / 8) = 4 batches each
    assert set(per_rank[0]) | set(per_rank[1]) == set(range(26))


def test_dataset_smaller_than_one_batch_per_rank_is_refused() -> None:
    with pytest.raises(UserError, match="7 sequences, fewer than one micro-batch per rank"):
        SequenceBatches(_sequences(7), micro_batch=4, rank=0, world_size=2, seed=0, reshuffle_each_epoch=True)


def test_rank_outside_the_world_is_refused() -> None:
    with pytest.raises(UserError, match="rank = 2, world_size = 2"):
        SequenceBatches(_sequences(8), micro_batch=1, rank=2, world_size=2, seed=0, reshuffle_each_epoch=True)


def test_position_beyond_the_epoch_is_refused_on_resume() -> None:
    batches = SequenceBatches(_sequences(8), micro_batch=2, rank=0, world_size=1, seed=0, reshuffle_each_epoch=True)
    with pytest.raises(UserError, match="4 batches per rank"):
        batches.load_state_dict({"epoch": 0, "batch_index": 5})
    assert batches.state_dict() == {"epoch": 0, "batch_index": 0, "samples": 0}  # unchanged after the refusal


def _global_steps(batches_by_rank: list[SequenceBatches], accumulation: int, steps: int) -> list[set[int]]:
    """The sequence ids each optimizer step takes over all ranks: `accumulation` micro-batches of every rank."""
    streams = [iter(_forever(b)) for b in batches_by_rank]
    return [{i for _ in range(accumulation) for s in streams for i in _ids(next(s))} for _ in range(steps)]


def _forever(batches: SequenceBatches):
    while True:
        yield from batches


@pytest.mark.parametrize("before, after", [((2, 2, 2), (2, 1, 4)), ((2, 1, 4), (2, 2, 2)), ((1, 2, 4), (4, 2, 1))],
                         ids=["2-ranks-to-1", "1-rank-to-2", "micro-1-to-micro-4"])
def test_a_global_batch_split_another_way_takes_the_same_sequences_each_step_and_resumes_between_them(before, after):
    """(micro, ranks, accumulation) splits of one global batch of 8 over 43 sequences: every step takes the same
    8 sequences, epochs end at the same step (5 whole steps; 3 sequences dropped), and a position saved under
    one split resumes under the other with the next step's sequences, across the epoch boundary."""
    data = _sequences(43)

    def ranks(micro: int, world: int, accumulation: int) -> list[SequenceBatches]:
        return [SequenceBatches(data, micro, r, world, seed=3, reshuffle_each_epoch=True, accumulation=accumulation)
                for r in range(world)]

    first, second = ranks(*before), ranks(*after)
    expected = _global_steps(ranks(*before), before[2], 12)
    assert _global_steps(ranks(*after), after[2], 12) == expected
    assert all(len(step) == 8 for step in expected)
    assert first[0].batches_per_epoch * before[0] * before[1] == 40  # 5 steps of 8: an epoch is whole steps
    got = _global_steps(first, before[2], 4)
    for old, new in zip(first, second, strict=False):
        new.load_state_dict(old.state_dict())
    for new in second[len(first):]:  # a rank the checkpoint did not have reads rank 0's position
        new.load_state_dict(first[0].state_dict())
    got += _global_steps(second, after[2], 8)
    assert got == expected


def test_an_elastic_position_that_splits_a_micro_batch_is_refused() -> None:
    batches = SequenceBatches(_sequences(40), micro_batch=4, rank=0, world_size=1, seed=0, reshuffle_each_epoch=True)
    with pytest.raises(UserError, match="not a whole number of micro-batches"):
        batches.load_state_dict({"epoch": 0, "batch_index": 3, "samples": 6})
