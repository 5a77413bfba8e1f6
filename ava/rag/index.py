"""Nearest chunks by inner product of unit vectors: exact (a matmul, no faiss needed) or approximate (faiss IVF-Flat).

Exact search keeps the (M, dim) matrix of chunk vectors and takes the top-k
of one matmul per block of chunks.  Approximate search clusters the vectors
into `nlist` inverted lists and scans the `nprobe` nearest lists per query;
faiss is an optional dependency (`pip install faiss-cpu`, or `.[rag]`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from ava.errors import UserError

EXACT = "exact"
APPROXIMATE = "approximate"
EXACT_FILE = "embeddings.npy"
FAISS_FILE = "index.faiss"
_MIN_POINTS_PER_LIST = 39  # faiss's k-means wants at least 39 training points per centroid
_TRAIN_POINTS_PER_LIST = 256  # k-means trains on at most this many points per centroid
_EXACT_BLOCK = 1 << 18  # chunks scored per matmul, bounding the (queries x block) score matrix


class ChunkIndex(Protocol):
    kind: str
    size: int

    def search(self, queries: np.ndarray, k: int) -> np.ndarray:
        """(Q, k) int64 chunk ids, nearest first; -1 where fewer than k were found."""
        ...

    def save(self, directory: Path) -> dict[str, Any]:
        """Write the index into the store's directory; returns the manifest's `search` entry."""
        ...


def import_faiss(why: str) -> Any:
    try:
        import faiss
    except ImportError as exc:
        raise UserError(f"{why} needs faiss, which is not installed",
                        "pip install faiss-cpu (or pip install -e .[rag]), or set rag.search: exact") from exc
    return faiss


def effective_nlist(requested: int, num_chunks: int) -> int:
    """`requested` centroids, at most one per 39 chunks (fewer leave k-means under-trained), at least 1."""
    return max(1, min(requested, num_chunks // _MIN_POINTS_PER_LIST))


class ExactIndex:
    """Brute-force inner product over all chunk vectors."""

    kind = EXACT

    def __init__(self, vectors: np.ndarray) -> None:
        self.vectors = torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32))
        self.size = int(vectors.shape[0])

    def search(self, queries: np.ndarray, k: int, exclude: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
        """As `ChunkIndex.search`; `exclude` = (query, chunk) pairs never to return, masked out of the scores."""
        q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))
        k_eff = min(k, self.size)
        best_scores: torch.Tensor | None = None
        best_ids = torch.empty(0)
        for start in range(0, self.size, _EXACT_BLOCK):
            scores = q @ self.vectors[start:start + _EXACT_BLOCK].T
            if exclude is not None:
                rows, cols = exclude
                here = (cols >= start) & (cols < start + scores.shape[1])
                scores[torch.from_numpy(rows[here]), torch.from_numpy(cols[here] - start)] = -torch.inf
            top = scores.topk(min(k_eff, scores.shape[1]), dim=1)
            ids = top.indices + start
            if best_scores is None:
                best_scores, best_ids = top.values, ids
            else:
                merged = torch.cat([best_scores, top.values], 1).topk(k_eff, dim=1)
                best_ids = torch.cat([best_ids, ids], 1).gather(1, merged.indices)
                best_scores = merged.values
        out = np.full((len(queries), k), -1, dtype=np.int64)
        if best_scores is not None:
            out[:, :k_eff] = torch.where(best_scores > -torch.inf, best_ids, -1).numpy()
        return out

    def save(self, directory: Path) -> dict[str, Any]:
        np.save(directory / EXACT_FILE, self.vectors.numpy())
        return {"kind": EXACT, "file": EXACT_FILE}


class FaissIndex:
    """faiss IVF-Flat, inner product."""

    kind = APPROXIMATE

    def __init__(self, index: Any, nlist: int, nprobe: int) -> None:
        self.index = index
        self.nlist = nlist
        self.size = int(index.ntotal)
        self.set_nprobe(nprobe)

    @classmethod
    def build(cls, vectors: np.ndarray, nlist: int, nprobe: int, seed: int = 0) -> FaissIndex:
        faiss = import_faiss("rag.search: approximate")
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        nlist = effective_nlist(nlist, len(vectors))
        dim = int(vectors.shape[1])
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        sample = vectors
        if len(vectors) > nlist * _TRAIN_POINTS_PER_LIST:
            rng = np.random.default_rng(seed)
            sample = vectors[np.sort(rng.choice(len(vectors), nlist * _TRAIN_POINTS_PER_LIST, replace=False))]
        index.train(sample)
        index.add(vectors)
        return cls(index, nlist, nprobe)

    def set_nprobe(self, nprobe: int) -> None:
        self.index.nprobe = max(1, min(nprobe, self.nlist))

    def search(self, queries: np.ndarray, k: int) -> np.ndarray:
        _, ids = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        return ids.astype(np.int64, copy=False)

    def save(self, directory: Path) -> dict[str, Any]:
        import_faiss("rag.search: approximate").write_index(self.index, str(directory / FAISS_FILE))
        return {"kind": APPROXIMATE, "file": FAISS_FILE, "nlist": self.nlist}


def build_index(vectors: np.ndarray, search: str, nlist: int, nprobe: int = 16) -> ChunkIndex:
    if search == EXACT:
        return ExactIndex(vectors)
    if search == APPROXIMATE:
        return FaissIndex.build(vectors, nlist, nprobe)
    raise UserError(f"rag.search = {search!r} is not a search kind", "use 'exact' or 'approximate'")


def read_faiss(path: Path, nlist: int, nprobe: int) -> FaissIndex:
    """A saved IVF index; a file faiss cannot read raises the caller's error (the store names the file)."""
    faiss = import_faiss(f"the approximate index {path}")
    return FaissIndex(faiss.read_index(str(path)), nlist, nprobe)
