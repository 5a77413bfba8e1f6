"""Random windows: contiguous windows at seeded offsets, distinct across ranks, resumable exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ava.data.batches import SequenceBatches
from ava.data.windows import RandomWindows
from ava.errors import UserError

LENGTH = 8
TOKENS = np.arange(1000, dtype=np.int64)  # token i is i, so a window tells where it starts


def _windows(rank: int = 0, world_size: int = 1, micro_batch: int = 3, seed: int = 7, reshuffle: bool = True,
             tokens: np.ndarray = TOKENS) -> RandomWindows:
    return RandomWindows(tokens, LENGTH, micro_batch, rank, world_size, seed, reshuffle)


def _starts(batches: RandomWindows, count: int) -> list[list[int]]:
    """The start offsets of the next `count` micro-batches, looping over epochs as a trainer does."""
    out: list[list[int]] = []
    while len(out) < count:
        for batch in batches:
            out.append(batch[:, 0].tolist())
            if len(out) == count:
                break
    return out


def test_windows_are_contiguous_long_rows_of_the_packed_row_shape() -> None:
    batches = _windows()
    assert batches.batches_per_epoch == 1000 // (LENGTH * 3) == 41  # as many window tokens as the stream holds
    got = list(batches)
    assert len(got) == 41
    for batch in got:
        assert batch.dtype == torch.long and batch.shape == (3, LENGTH)
        assert (batch == batch[:, :1] + torch.arange(LENGTH)).all()  # a contiguous stretch of the stream
        assert batch[:, 0].max() <= 1000 - LENGTH
    assert len({start for b in got for start in b[:, 0].tolist()}) > 100  # offsets anywhere, not row-aligned
    assert any(start % LENGTH for b in got for start in b[:, 0].tolist())


def test_windows_are_a_function_of_the_seed_epoch_and_batch() -> None:
    assert _starts(_windows(), 90) == _starts(_windows(), 90)
    assert _starts(_windows(seed=8), 5) != _starts(_windows(), 5)
    two_epochs = _starts(_windows(), 82)
    assert two_epochs[:41] != two_epochs[41:]  # reshuffled each epoch
    fixed = _starts(_windows(reshuffle=False), 82)
    assert fixed[:41] == fixed[41:]


def test_ranks_take_distinct_slices_of_one_global_draw() -> None:
    world = 3
    ranks = [_starts(_windows(rank=r, world_size=world, micro_batch=2), 13) for r in range(world)]
    single = _starts(_windows(micro_batch=2 * world), 13)  # one process with the same global batch
    assert _windows(world_size=world, micro_batch=2).batches_per_epoch == 1000 // (LENGTH * 2 * world)
    for index in range(13):
        starts = [s for rank in ranks for s in rank[index]]
        assert len(set(starts)) == len(starts) == 2 * world  # no two windows of a global batch start together
        assert starts == single[index]


@pytest.mark.parametrize("stop_after", [0, 1, 40, 41, 42, 60])  # 41 = exactly one epoch
def test_resumed_windows_are_the_uninterrupted_windows(stop_after: int) -> None:
    uninterrupted = _starts(_windows(rank=1, world_size=2), 70)
    first = _windows(rank=1, world_size=2)
    before = _starts(first, stop_after)
    resumed = _windows(rank=1, world_size=2)
    resumed.load_state_dict(first.state_dict())
    assert before + _starts(resumed, 70 - stop_after) == uninterrupted


def test_a_packed_position_is_not_taken_for_a_windows_position_nor_the_reverse() -> None:
    packed = SequenceBatches(TOKENS.reshape(-1, LENGTH), 3, 0, 1, 7, True)
    with pytest.raises(UserError, match="not a random-windows position") as err:
        _windows().load_state_dict(packed.state_dict())
    assert "data.sampling" in err.value.fix
    with pytest.raises(UserError, match="is not valid here"):
        packed.load_state_dict(_windows().state_dict())


def test_too_few_tokens_for_one_global_batch_is_refused() -> None:
    with pytest.raises(UserError, match="fewer than one global batch of windows") as err:
        RandomWindows(np.arange(40), LENGTH, 3, 0, 2, 0, True)
    assert "data.max_length" in err.value.fix


def test_windows_read_a_memory_mapped_token_file_as_int64(tmp_path: Path) -> None:
    (np.arange(3000) % 60000).astype(np.uint16).tofile(tmp_path / "train.bin")
    tokens = np.memmap(tmp_path / "train.bin", dtype=np.uint16, mode="r")
    batch = next(iter(RandomWindows(tokens, LENGTH, 4, 0, 1, 3, True)))
    assert batch.dtype == torch.long and (batch == batch[:, :1] + torch.arange(LENGTH)).all()


@pytest.mark.parametrize("before, after", [((2, 2, 2), (2, 1, 4)), ((2, 1, 4), (2, 2, 2))],
                         ids=["2-ranks-to-1", "1-rank-to-2"])
def test_windows_of_a_global_batch_split_another_way_are_the_same_each_step_and_resume_between_them(before, after):
    """(micro, ranks, accumulation) splits of a global batch of 8 windows: every step draws the same windows,
    epochs end at the same step, and a position saved under one split resumes under the other."""

    def ranks(micro: int, world: int, accumulation: int) -> list[RandomWindows]:
        return [RandomWindows(TOKENS, LENGTH, micro, r, world, 7, True, accumulation=accumulation)
                for r in range(world)]

    def steps(batches: list[RandomWindows], accumulation: int, count: int) -> list[set[int]]:
        streams = [iter(_loop(b)) for b in batches]
        return [{int(x) for _ in range(accumulation) for s in streams for x in next(s)[:, 0]} for _ in range(count)]

    expected = steps(ranks(*before), before[2], 40)  # 1000 tokens hold 15 steps of 8 windows: over two epochs
    assert steps(ranks(*after), after[2], 40) == expected and all(len(s) == 8 for s in expected)
    first, second = ranks(*before), ranks(*after)
    got = steps(first, before[2], 17)
    for r, new in enumerate(second):
        new.load_state_dict(first[min(r, len(first) - 1)].state_dict())
    assert got + steps(second, after[2], 23) == expected


def _loop(batches: RandomWindows):
    while True:
        yield from batches
