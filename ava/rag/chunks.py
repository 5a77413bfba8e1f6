"""The training stream cut into retrieval chunks: their tokens, documents and exact-match hashes.

The packed training rows, read in order, are the documents joined by eos
(`ava.data.packing`), so the flattened rows are the training stream; it is cut
into consecutive chunks of `chunk_size` tokens, RETRO's retrieval units.  Rows
must be a whole number of chunks, so that chunk j of any training row is one
stored chunk exactly and a training query can be found in the store.
"""

from __future__ import annotations

import hashlib

import numpy as np

from ava.errors import UserError

# Multiplier of the polynomial hash: odd (invertible mod 2^64) and with well-spread bits.
_HASH_BASE = np.uint64(0x9E3779B97F4A7C15)


def cut_chunks(rows: np.ndarray, chunk_size: int) -> np.ndarray:
    """(num_chunks, chunk_size) tokens of the flattened (N, L) rows; L must be a multiple of chunk_size."""
    if rows.ndim != 2:
        raise UserError(f"training rows have shape {tuple(rows.shape)}, expected (num_sequences, max_length)",
                        "pass the packed training sequences (ava.data.packing.pack_documents)")
    if chunk_size < 1:
        raise UserError(f"rag.chunk_size = {chunk_size} must be positive", "set rag.chunk_size, e.g. 64")
    length = int(rows.shape[1])
    if length % chunk_size:
        raise UserError(
            f"data.max_length = {length} is not a multiple of rag.chunk_size = {chunk_size}, so the chunks of a "
            "training row would not be the chunks of the store, and a row could retrieve its own text",
            f"set rag.chunk_size to a divisor of {length} (e.g. {_divisor_near(length, chunk_size)}), or "
            f"data.max_length to a multiple of {chunk_size}")
    if rows.size < chunk_size:
        raise UserError(f"the training data has {rows.size} tokens, fewer than one chunk of {chunk_size}",
                        "use more training data or a smaller rag.chunk_size")
    if rows.size and (int(rows.min()) < 0 or int(rows.max()) > np.iinfo(np.int32).max):
        raise UserError("the training rows hold token ids outside [0, 2^31)", "check the tokenizer / token files")
    return np.ascontiguousarray(rows, dtype=np.int32).reshape(-1, chunk_size)


def _divisor_near(length: int, wanted: int) -> int:
    divisors = [d for d in range(1, length + 1) if length % d == 0]
    return min(divisors, key=lambda d: (abs(d - wanted), -d))


def chunk_documents(rows: np.ndarray, chunk_size: int, eos_id: int | None) -> np.ndarray:
    """(num_chunks, 2) int64: the first and the last document each chunk overlaps.

    With `eos_id`, documents end at each eos (the eos belongs to the document it
    ends); without one (token files, the Markov corpus) each row is a document.
    """
    length = int(rows.shape[1])
    chunks = np.asarray(rows).reshape(-1, chunk_size)
    if eos_id is None:
        start = np.arange(len(chunks), dtype=np.int64) * chunk_size
        return np.stack([start // length, (start + chunk_size - 1) // length], axis=1)
    ends = chunks == eos_id
    per_chunk = ends.sum(axis=1, dtype=np.int64)
    first = np.cumsum(per_chunk) - per_chunk  # eos tokens before the chunk: its first document
    last = first + ends[:, :-1].sum(axis=1, dtype=np.int64)  # an eos in the last position ends the last document
    return np.stack([first, last], axis=1)


def chunk_hashes(chunks: np.ndarray) -> np.ndarray:
    """64-bit polynomial hash of each row of `chunks` (M, c), vectorised; equal tokens give equal hashes."""
    chunks = np.asarray(chunks)
    c = int(chunks.shape[1])
    powers = np.ones(c, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for i in range(c - 2, -1, -1):  # c small multiplications, once per call
            powers[i] = powers[i + 1] * _HASH_BASE
        values = chunks.astype(np.int64).astype(np.uint64) + np.uint64(1)
        h = (values * powers).sum(axis=1, dtype=np.uint64)
        # splitmix64's finaliser: spreads the bits, so sorted hashes are uniform
        h ^= h >> np.uint64(30)
        h *= np.uint64(0xBF58476D1CE4E5B9)
        h ^= h >> np.uint64(27)
        h *= np.uint64(0x94D049BB133111EB)
        h ^= h >> np.uint64(31)
    return h


def data_fingerprint(rows: np.ndarray) -> str:
    """sha256 of the training rows (as int64) and their shape: which data a store was built from."""
    digest = hashlib.sha256(f"{tuple(rows.shape)}".encode())
    digest.update(np.ascontiguousarray(rows, dtype=np.int64).data.cast("B"))
    return digest.hexdigest()
