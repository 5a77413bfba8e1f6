"""Streaming batches: packed on the fly, split across ranks, and resumed exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ava.data.streaming import StreamingBatches, rank_documents
from ava.data.tokenizer import ByteTokenizer
from ava.errors import UserError

LENGTH = 16


def _epoch_documents(epoch: int) -> list[str]:
    """A deterministic stream per epoch: the same 40 documents, in an order that depends on the epoch."""
    rng = np.random.default_rng(epoch)
    docs = [f"doc{i}:" + "x" * (i % 13) for i in range(40)]
    return [docs[i] for i in rng.permutation(40)]


def _batches(prefetch_depth: int = 0, micro_batch: int = 3) -> StreamingBatches:
    return StreamingBatches(_epoch_documents, ByteTokenizer(), LENGTH, micro_batch, nominal_batches_per_epoch=5,
                            prefetch_depth=prefetch_depth)


def _take(batches: StreamingBatches, count: int) -> list[list[list[int]]]:
    """The next `count` batches, looping over epochs as the trainer does."""
    out: list[list[list[int]]] = []
    while len(out) < count:
        for batch in batches:
            out.append(batch.tolist())
            if len(out) == count:
                break
    return out


def test_batches_are_long_tensors_of_packed_documents() -> None:
    batches = list(_batches())
    assert all(b.dtype == torch.long and b.shape == (3, LENGTH) for b in batches)
    stream = b"".join(d.encode() + b"\x00" for d in _epoch_documents(0))  # eos stands in as byte 0 below
    got = torch.cat(batches).reshape(-1)
    got = torch.where(got == ByteTokenizer.eos_id, torch.zeros_like(got), got)
    assert bytes(got.tolist()) == stream[: got.numel()]
    assert len(batches) == len(stream) // (3 * LENGTH)  # only the last partial micro-batch is dropped


def test_each_epoch_reads_its_own_order_and_iteration_moves_on() -> None:
    batches = _batches()
    first, second = [b.tolist() for b in batches], [b.tolist() for b in batches]
    assert first != second
    assert batches.state_dict()["epoch"] == 2


@pytest.mark.parametrize("stop_after", [0, 1, 4, 9, 13, 20])
def test_resumed_stream_yields_the_same_batches_as_uninterrupted(stop_after: int) -> None:
    uninterrupted = _take(_batches(), 25)
    first = _batches()
    before = _take(first, stop_after)
    resumed = _batches()
    resumed.load_state_dict(first.state_dict())
    assert before + _take(resumed, 25 - stop_after) == uninterrupted


def test_prefetching_changes_neither_the_batches_nor_the_positions() -> None:
    plain, ahead = _batches(), _batches(prefetch_depth=4)
    for _ in range(14):
        assert _take(plain, 1) == _take(ahead, 1)
        assert plain.state_dict() == ahead.state_dict()
    resumed = _batches(prefetch_depth=2)
    resumed.load_state_dict(ahead.state_dict())
    assert _take(resumed, 6) == _take(plain, 6)


def test_a_stream_too_small_for_one_micro_batch_is_refused_instead_of_spinning() -> None:
    tiny = StreamingBatches(lambda epoch: ["ab", "cd"], ByteTokenizer(), LENGTH, 2, nominal_batches_per_epoch=1)
    with pytest.raises(UserError, match="gave this rank no full micro-batch"):
        list(tiny)


def test_a_map_style_position_is_refused() -> None:
    with pytest.raises(UserError, match="is not a streaming position"):
        _batches().load_state_dict({"epoch": 0, "batch_index": 3})


def test_batches_per_epoch_is_the_nominal_count_given() -> None:
    assert _batches().batches_per_epoch == 5


def _dataset(count: int):
    from datasets import Dataset

    # Four shards: a world of 2 splits by whole shards, a world of 3 by every third document.
    return Dataset.from_dict({"text": [f"d{i}" for i in range(count)]}).to_iterable_dataset(num_shards=4)


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_read_disjoint_shares_that_cover_the_stream(world_size: int) -> None:
    dataset = _dataset(60)
    shares = [list(rank_documents(dataset, seed=3, buffer_size=8, rank=r, world_size=world_size,
                                  reshuffle_each_epoch=True)(0)) for r in range(world_size)]
    seen = [d for share in shares for d in share]
    assert len(seen) == len(set(seen)) == 60


def test_rank_documents_repeat_an_epoch_exactly_and_reshuffle_only_when_asked() -> None:
    dataset = _dataset(60)
    reshuffled = rank_documents(dataset, seed=3, buffer_size=8, rank=0, world_size=1, reshuffle_each_epoch=True)
    assert list(reshuffled(1)) == list(reshuffled(1))
    assert list(reshuffled(0)) != list(reshuffled(1))
    assert sorted(reshuffled(0)) == sorted(reshuffled(1))
    fixed = rank_documents(dataset, seed=3, buffer_size=8, rank=0, world_size=1, reshuffle_each_epoch=False)
    assert list(fixed(0)) == list(fixed(1)) == list(reshuffled(0))
    assert list(fixed(0)) != [f"d{i}" for i in range(60)]  # shuffled at all
