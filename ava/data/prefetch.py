"""Batches prepared ahead in one background thread, handed out in exactly the order they were made.

One producer, not a pool of DataLoader workers: with several, which worker's
batch comes next, and so where a resumed run must restart each of them, would
depend on the pool; with one, the order is the iterator's own.  Each item
carries its own resume position, so prefetching never changes what a
checkpoint records.  A thread suffices because the heavy parts, Arrow reading
and Rust tokenisation, release the GIL.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import TypeVar, cast

T = TypeVar("T")

_POLL_SECONDS = 0.1  # how often a producer blocked on a full queue checks whether it should stop


def prefetch(items: Iterator[T], depth: int) -> Iterator[T]:
    """Yield `items` in order while a thread computes up to `depth` of them ahead.

    An exception in the thread is raised here, at the item where it happened;
    closing this generator (or dropping it) stops and joins the thread.
    """
    if depth < 1:
        raise ValueError(f"prefetch depth must be >= 1, got {depth}")
    slots: queue.Queue[tuple[str, object]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(kind: str, value: object) -> bool:
        while not stop.is_set():
            try:
                slots.put((kind, value), timeout=_POLL_SECONDS)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put("item", item):
                    return
            put("end", None)
        except BaseException as error:  # handed to the consumer, which raises it in its own thread
            put("error", error)

    thread = threading.Thread(target=produce, name="ava-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = slots.get()
            if kind == "end":
                return
            if kind == "error":
                assert isinstance(value, BaseException)
                raise value
            yield cast(T, value)
    finally:
        stop.set()
        thread.join()
