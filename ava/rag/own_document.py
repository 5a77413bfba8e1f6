"""Which stored neighbours come from a query chunk's own document, so that retrieval can leave them out.

RETRO never lets a training chunk retrieve its own document: the neighbour
would hand the model the very text it is asked to predict.  A training query
chunk is found in the store by exact match (sorted 64-bit hashes, tokens
compared on a hit, so a collision never excludes a stranger); the documents of
every stored chunk equal to it are its own.  A chunk repeated in several
documents (a licence header) therefore excludes all of them, which also keeps
out neighbours that are verbatim copies of the query.  A query not in the
store (held-out text) excludes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ava.rag.chunks import chunk_hashes


@dataclass(frozen=True)
class ExactMatchTable:
    """Stored chunks by hash: `hashes` sorted, `order[i]` the chunk whose hash is `hashes[i]`."""

    hashes: np.ndarray  # (M,) uint64, ascending; equal hashes in ascending chunk order
    order: np.ndarray  # (M,) int64

    @classmethod
    def build(cls, chunks: np.ndarray) -> ExactMatchTable:
        hashes = chunk_hashes(chunks)
        order = np.argsort(hashes, kind="stable").astype(np.int64)
        return cls(hashes[order], order)

    def matches(self, queries: np.ndarray, chunks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(query index, stored chunk index) of every stored chunk whose tokens equal a query's, by query then chunk."""
        h = chunk_hashes(queries)
        lo = np.searchsorted(self.hashes, h, side="left")
        hi = np.searchsorted(self.hashes, h, side="right")
        counts = hi - lo
        query = np.repeat(np.arange(len(queries), dtype=np.int64), counts)
        offsets = np.arange(int(counts.sum()), dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
        chunk = self.order[np.repeat(lo, counts) + offsets]
        same = (chunks[chunk] == queries[query]).all(axis=1)  # a hash collision is not a match
        return query[same], chunk[same]


@dataclass(frozen=True)
class OwnChunks:
    """The stored chunks of each query's own document(s): disjoint intervals [lo, hi), by query then lo.

    Documents are contiguous in the stream, so the chunks overlapping a range
    of documents are one interval of chunk indices.
    """

    query: np.ndarray  # (P,) int64
    lo: np.ndarray  # (P,) int64
    hi: np.ndarray  # (P,) int64
    num_chunks: int

    @classmethod
    def of(cls, query: np.ndarray, chunk: np.ndarray, documents: np.ndarray) -> OwnChunks:
        """From `ExactMatchTable.matches` (by query, then chunk) and the store's (M, 2) chunk documents."""
        lo = np.searchsorted(documents[:, 1], documents[chunk, 0], side="left")  # first chunk reaching the document
        hi = np.searchsorted(documents[:, 0], documents[chunk, 1], side="right")  # past the last chunk starting in it
        if query.size:  # merge overlapping intervals of one query: both ends ascend with the chunk
            starts = np.ones(query.size, dtype=bool)
            starts[1:] = (query[1:] != query[:-1]) | (lo[1:] > hi[:-1])
            first = np.flatnonzero(starts)
            last = np.append(first[1:], query.size) - 1
            query, lo, hi = query[first], lo[first], hi[last]
        return cls(query.astype(np.int64), lo.astype(np.int64), hi.astype(np.int64), len(documents))

    def excludes(self, queries: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        """(Q, K) bool: candidate chunk `candidates[i, j]` (-1 = none) is in an interval of query `queries[i]`."""
        if self.query.size == 0:
            return np.zeros(candidates.shape, dtype=bool)
        stride = self.num_chunks + 1
        keys = self.query * stride + self.hi  # ascending: intervals are disjoint and sorted within a query
        at = np.searchsorted(keys, queries[:, None] * stride + candidates, side="right")  # first with hi > candidate
        inside = at < keys.size
        at = np.minimum(at, keys.size - 1)
        return inside & (self.query[at] == queries[:, None]) & (self.lo[at] <= candidates) & (candidates >= 0)

    def positions(self) -> tuple[np.ndarray, np.ndarray]:
        """(query, chunk) of every excluded pair, for masking a dense (Q, M) score matrix."""
        lengths = self.hi - self.lo
        offsets = np.arange(int(lengths.sum()), dtype=np.int64) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        return np.repeat(self.query, lengths), np.repeat(self.lo, lengths) + offsets
