"""Own-document exclusion against a brute-force reference, including chunks repeated in several documents."""

from __future__ import annotations

import numpy as np

from ava.rag.own_document import OwnChunks


def _documents(rng: np.random.Generator, chunks: int) -> np.ndarray:
    """(chunks, 2) first/last documents of a random stream: each chunk ends 0-2 documents after it starts."""
    ends = rng.choice(3, chunks, p=[0.6, 0.3, 0.1])
    first = np.concatenate([[0], np.cumsum(ends)[:-1]])
    return np.stack([first, first + ends], axis=1)


def test_exclusion_equals_document_overlap_for_every_candidate():
    rng = np.random.default_rng(0)
    documents = _documents(rng, 300)
    queries = 12
    # Queries 0-9 match 1-4 stored chunks each (a chunk repeated across documents); 10 and 11 match none.
    pairs = sorted({(q, int(c)) for q in range(10) for c in rng.choice(300, int(rng.integers(1, 5)), replace=False)})
    query = np.array([p[0] for p in pairs])
    chunk = np.array([p[1] for p in pairs])
    own = OwnChunks.of(query, chunk, documents)
    candidates = np.tile(np.arange(-1, 300), (queries, 1))
    got = own.excludes(np.arange(queries), candidates)
    expected = np.zeros_like(got)
    for q, c in pairs:
        f, last = documents[c]
        expected[q, 1:] |= (documents[:, 0] <= last) & (documents[:, 1] >= f)
    assert (got == expected).all()
    assert not got[10:].any() and not got[:, 0].any()  # unmatched queries and the -1 candidate: nothing excluded
    rows, cols = own.positions()
    dense = np.zeros((queries, 300), dtype=bool)
    dense[rows, cols] = True
    assert (dense == expected[:, 1:]).all() and len(rows) == expected.sum()  # merged: no pair listed twice
