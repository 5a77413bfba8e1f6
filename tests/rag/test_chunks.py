"""Chunking the training stream, the documents each chunk overlaps, and the exact-match hashes."""

from __future__ import annotations

import numpy as np
import pytest

from ava.data.packing import pack_documents
from ava.errors import UserError
from ava.rag import chunk_documents, cut_chunks
from ava.rag.chunks import chunk_hashes
from ava.rag.own_document import ExactMatchTable


def test_chunks_are_the_flattened_stream_cut_in_order():
    rows = np.arange(24, dtype=np.int64).reshape(3, 8)
    chunks = cut_chunks(rows, 4)
    assert chunks.shape == (6, 4)
    assert chunks.reshape(-1).tolist() == list(range(24))


def test_document_ids_follow_eos_and_an_eos_belongs_to_the_document_it_ends():
    eos = 99
    rows = pack_documents([[1, 2, 3], [4, 5, 6, 7, 8, 9], [10, 11, 12, 13, 14]], 4, eos)
    # stream: 1 2 3 E | 4 5 6 7 | 8 9 E 10 | 11 12 13 14  (the last eos was cut off with the partial row)
    assert rows.reshape(-1).tolist() == [1, 2, 3, eos, 4, 5, 6, 7, 8, 9, eos, 10, 11, 12, 13, 14]
    assert chunk_documents(rows, 4, eos).tolist() == [[0, 0], [1, 1], [1, 2], [2, 2]]
    assert chunk_documents(rows, 2, eos).tolist() == [[0, 0], [0, 0], [1, 1], [1, 1], [1, 1], [1, 2], [2, 2], [2, 2]]


def test_without_eos_each_row_is_its_own_document():
    rows = np.arange(24, dtype=np.int64).reshape(3, 8)
    assert chunk_documents(rows, 4, None).tolist() == [[0, 0], [0, 0], [1, 1], [1, 1], [2, 2], [2, 2]]


def test_a_row_length_that_is_not_a_multiple_of_the_chunk_size_is_refused():
    with pytest.raises(UserError, match="not a multiple of rag.chunk_size = 4"):
        cut_chunks(np.zeros((2, 10), dtype=np.int64), 4)


def test_hashes_are_equal_exactly_for_equal_chunks():
    rng = np.random.default_rng(0)
    chunks = rng.integers(0, 50_000, (2000, 16))
    chunks[7] = chunks[3]
    swapped = chunks[3].copy()
    swapped[[0, 1]] = swapped[[1, 0]]
    h = chunk_hashes(np.vstack([chunks, swapped]))
    assert h[7] == h[3] and h[-1] != h[3]  # order matters: a swap is another chunk
    assert len(np.unique(h)) == 2000  # 2000 distinct chunks (7 repeats 3, the swap is new)


def test_exact_match_table_finds_every_copy_and_ignores_a_hash_collision():
    rng = np.random.default_rng(1)
    chunks = rng.integers(0, 1000, (50, 8)).astype(np.int32)
    chunks[30] = chunks[10]
    table = ExactMatchTable.build(chunks)
    unseen = rng.integers(1000, 2000, (1, 8))
    query, chunk = table.matches(np.vstack([chunks[[10, 5]], unseen]), chunks)
    assert list(zip(query.tolist(), chunk.tolist(), strict=True)) == [(0, 10), (0, 30), (1, 5)]
    # A collision, forged: the table claims chunk 6 has chunk 5's hash. The token check rejects the hit.
    order = table.order.copy()
    order[order == 5] = 6
    query, chunk = ExactMatchTable(table.hashes, order).matches(chunks[[5]], chunks)
    assert chunk.tolist() == []
