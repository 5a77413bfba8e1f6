"""Packing: documents joined into fixed-length training rows, with no padding.

Every row is full, so no compute is spent on padding and no attention mask is
needed; the end-of-document id after each document tells the model where one
text ends and the next (unrelated) one begins.

`pack_documents` packs a corpus held in memory; `pack_stream` packs the same
way lazily, for a stream, and says after every row where in the stream the
next row starts, which is what an exact resume needs.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np

from ava.errors import UserError

# Where a row starts in a stream: (index of the document, offset into that document's ids followed by eos).
Position = tuple[int, int]


def pack_documents(token_lists: Iterable[Sequence[int] | np.ndarray], max_length: int, eos_id: int) -> np.ndarray:
    """Concatenate documents, each followed by `eos_id`, and cut into rows of exactly `max_length`.

    Returns an int64 array of shape (num_sequences, max_length); the final partial
    row is dropped, so the result may have zero rows for a small corpus.
    """
    if max_length <= 0:
        raise UserError(f"max_length = {max_length} must be positive", "set data.max_length > 0")
    pieces: list[np.ndarray] = []
    eos = np.array([eos_id], dtype=np.int64)
    for tokens in token_lists:
        pieces.append(np.asarray(tokens, dtype=np.int64).reshape(-1))
        pieces.append(eos)
    stream = np.concatenate(pieces) if pieces else np.empty(0, dtype=np.int64)
    rows = stream.size // max_length
    return stream[: rows * max_length].reshape(rows, max_length)


def pack_stream(documents: Iterable[str | None], encode: Callable[[Sequence[str]], list[np.ndarray]],
                max_length: int, eos_id: int, start: Position = (0, 0),
                chunk: int = 64) -> Iterator[tuple[np.ndarray, Position]]:
    """Rows of exactly `max_length` packed from a stream of texts, each with the Position the next row starts at.

    The rows are those `pack_documents` makes of the non-empty texts (empty and
    None texts are skipped but still counted in document indices).  Started at a
    Position from an earlier pass over the same stream, it continues with the row
    that pass would have made next: documents before it are read, not tokenised.
    Texts are encoded `chunk` at a time, so a batch-capable tokenizer is fast.
    """
    if max_length <= 0:
        raise UserError(f"max_length = {max_length} must be positive", "set data.max_length > 0")
    first_document, first_offset = start
    pending: deque[tuple[int, np.ndarray, int]] = deque()  # (document, its ids not yet in a row, their offset)
    buffered = 0
    for index, ids in _encoded(documents, encode, eos_id, first_document, chunk):
        offset = 0
        if first_offset and not (index == first_document and first_offset < ids.size):
            raise UserError(
                f"data position {start} does not fit this data: document {first_document} "
                + (f"has only {ids.size} tokens" if index == first_document else "is empty or missing"),
                "resume with the data, tokenizer, seed and number of ranks the checkpoint was written with")
        if first_offset:
            ids, offset, first_offset = ids[first_offset:], first_offset, 0
        pending.append((index, ids, offset))
        buffered += ids.size
        while buffered >= max_length:
            row = np.empty(max_length, dtype=np.int64)
            filled = 0
            while filled < max_length:
                document, rest, at = pending[0]
                take = min(max_length - filled, rest.size)
                row[filled:filled + take] = rest[:take]
                filled += take
                if take == rest.size:
                    pending.popleft()
                else:
                    pending[0] = (document, rest[take:], at + take)
            buffered -= max_length
            yield row, ((pending[0][0], pending[0][2]) if pending else (index + 1, 0))


def _encoded(documents: Iterable[str | None], encode: Callable[[Sequence[str]], list[np.ndarray]], eos_id: int,
             first: int, chunk: int) -> Iterator[tuple[int, np.ndarray]]:
    """(index, ids followed by eos) of each non-empty text from index `first` on, encoded `chunk` texts at a time."""
    eos = np.array([eos_id], dtype=np.int64)
    indices: list[int] = []
    texts: list[str] = []
    for index, text in enumerate(documents):
        if index < first or text is None or text == "":
            continue
        if not isinstance(text, str):
            raise UserError(f"document {index} of the stream is a {type(text).__name__}, not text",
                            "point data.sources[i].text_field at a column that holds only text")
        indices.append(index)
        texts.append(text)
        if len(texts) == chunk:
            yield from zip(indices, (np.concatenate([ids, eos]) for ids in encode(texts)), strict=True)
            indices, texts = [], []
    if texts:
        yield from zip(indices, (np.concatenate([ids, eos]) for ids in encode(texts)), strict=True)
