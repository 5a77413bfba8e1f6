"""The background producer: same items in the same order, errors surfaced, and no thread left behind."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from ava.data.prefetch import prefetch


def _threads() -> int:
    return sum(t.name == "ava-prefetch" for t in threading.enumerate())


def test_items_arrive_in_order() -> None:
    assert list(prefetch(iter(range(100)), depth=3)) == list(range(100))


def test_the_producer_runs_ahead_by_at_most_depth_items() -> None:
    made: list[int] = []

    def items() -> Iterator[int]:
        for i in range(50):
            made.append(i)
            yield i

    stream = prefetch(items(), depth=4)
    assert next(stream) == 0
    for _ in range(100):  # let the producer fill the queue
        threading.Event().wait(0.001)
    # one handed out + 4 queued + 1 made and waiting for a free slot
    assert len(made) <= 6
    stream.close()


def test_an_error_in_the_producer_is_raised_to_the_consumer_in_place() -> None:
    def items() -> Iterator[int]:
        yield 1
        raise RuntimeError("bad record")

    stream = prefetch(items(), depth=2)
    assert next(stream) == 1
    with pytest.raises(RuntimeError, match="bad record"):
        next(stream)


def test_closing_early_stops_the_thread() -> None:
    before = _threads()
    stream = prefetch(iter(range(10_000)), depth=2)
    assert next(stream) == 0
    assert _threads() == before + 1
    stream.close()
    assert _threads() == before
