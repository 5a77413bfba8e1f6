"""Packing: documents joined into fixed-length training rows, with no padding.

Every row is full, so no compute is spent on padding and no attention mask is
needed; the end-of-document id after each document tells the model where one
text ends and the next (unrelated) one begins.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from ava.model.errors import ModelInputError


def pack_documents(token_lists: Iterable[Sequence[int] | np.ndarray], max_length: int, eos_id: int) -> np.ndarray:
    """Concatenate documents, each followed by `eos_id`, and cut into rows of exactly `max_length`.

    Returns an int64 array of shape (num_sequences, max_length); the final partial
    row is dropped, so the result may have zero rows for a small corpus.
    """
    if max_length <= 0:
        raise ModelInputError(f"max_length = {max_length} must be positive", "set data.max_length > 0")
    pieces: list[np.ndarray] = []
    eos = np.array([eos_id], dtype=np.int64)
    for tokens in token_lists:
        pieces.append(np.asarray(tokens, dtype=np.int64).reshape(-1))
        pieces.append(eos)
    stream = np.concatenate(pieces) if pieces else np.empty(0, dtype=np.int64)
    rows = stream.size // max_length
    return stream[: rows * max_length].reshape(rows, max_length)
