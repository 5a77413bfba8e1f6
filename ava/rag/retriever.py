"""Neighbours of every chunk of a batch, from a store built by `build_store`.

`Retriever.open(dir)` reads and checks a store; `neighbours(tokens, k)` cuts
each row into chunks of the store's chunk size, encodes them with the store's
own encoder, searches the index, drops neighbours from the query's own
document(s) (`ava.rag.own_document`) and returns each neighbour with its
continuation: RETRO's [N, F], 2 x chunk_size tokens.  Everything is batched
numpy/torch, cheap enough to run on the CPU for every training micro-batch.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ava.errors import UserError
from ava.rag.encoder import ChunkEncoder, load_encoder
from ava.rag.index import APPROXIMATE, FAISS_FILE, ChunkIndex, ExactIndex, read_faiss
from ava.rag.own_document import OwnChunks
from ava.rag.store import StoreFiles, read_store, rebuild_fix

OVERFETCH = 8  # approximate search: candidates beyond k, so own-document hits can be dropped without a second search


class Retriever:
    """Nearest chunks (with continuations) from one store."""

    def __init__(self, store: StoreFiles, encoder: ChunkEncoder, index: ChunkIndex) -> None:
        self.store = store
        self.encoder = encoder
        self.index = index
        self.chunk_size = int(store.manifest["chunk_size"])
        self.num_chunks = int(store.manifest["num_chunks"])

    @classmethod
    def open(cls, directory: str | Path, decode: Callable[[list[int]], str] | None = None, nprobe: int = 16,
             verify: bool = False) -> Retriever:
        """Open the store in `directory`.

        `decode` (the data tokenizer's) is needed by a store built with a Hugging
        Face encoder; `nprobe` is the number of inverted lists an approximate
        index scans per query; `verify` checks every file's sha256.
        """
        store = read_store(directory, verify)
        search = store.manifest["search"]
        index: ChunkIndex
        if search["kind"] == APPROXIMATE:
            path = store.directory / FAISS_FILE
            try:
                index = read_faiss(path, int(search["nlist"]), nprobe)
            except RuntimeError as exc:  # faiss reports an unreadable file as a RuntimeError
                raise UserError(f"retrieval store file {path} is unusable: faiss cannot read it "
                                f"({str(exc).strip().splitlines()[-1]})", rebuild_fix(store.directory)) from exc
            if index.size != int(store.manifest["num_chunks"]):
                raise UserError(f"retrieval store file {path} is unusable: it holds {index.size} vectors, the "
                                f"manifest says {store.manifest['num_chunks']}", rebuild_fix(store.directory))
        else:
            assert store.vectors is not None
            index = ExactIndex(store.vectors)
        encoder = load_encoder(store.directory, store.manifest["encoder"], decode, store.encoder_table)
        return cls(store, encoder, index)

    @property
    def manifest(self) -> dict[str, Any]:
        return self.store.manifest

    def check(self, chunk_size: int | None = None, data_fingerprint: str | None = None,
              encoder_fingerprint: str | None = None) -> None:
        """Refuse a store built with another chunk size, from other data, or with another encoder."""
        m, where = self.store.manifest, self.store.directory
        if chunk_size is not None and chunk_size != m["chunk_size"]:
            raise UserError(f"the retrieval store in {where} was built with another chunk_size "
                            f"({m['chunk_size']}, not {chunk_size})", rebuild_fix(where))
        fingerprints = {"data": (data_fingerprint, m["data_fingerprint"]),
                        "encoder": (encoder_fingerprint, m["encoder"]["fingerprint"])}
        for what, (want, have) in fingerprints.items():
            if want is not None and want != have:
                raise UserError(f"the retrieval store in {where} was built with another {what} (fingerprint "
                                f"{str(have)[:12]}, not {want[:12]})", rebuild_fix(where))

    def neighbours(self, tokens: torch.Tensor, k: int, exclude_own_document: bool = True) -> torch.Tensor:
        """(B, S // c, k, 2c) int64 neighbour tokens of each chunk of `tokens` (B, S); -1 where missing.

        Neighbour i of chunk j of row b is a stored chunk followed by its
        continuation, nearest first; a trailing partial chunk is not queried.
        With `exclude_own_document`, a query chunk found verbatim in the store
        gets no neighbour from the document(s) it came from, nor from those of
        the chunk after it in its row: chunk j's neighbours are read by the
        positions that predict chunk j+1 (RETRO's offset), so a neighbour from
        chunk j+1's document (a document that starts on the chunk boundary, or
        a verbatim copy) would hand them the very tokens they predict.
        """
        if tokens.ndim != 2:
            raise UserError(f"retrieval queries have shape {tuple(tokens.shape)}, expected (batch, sequence)",
                            "pass the (batch, sequence) token ids")
        if k < 1:
            raise UserError(f"rag.num_neighbours = {k} must be at least 1", "set rag.num_neighbours, e.g. 2")
        c = self.chunk_size
        batch, per_row = int(tokens.shape[0]), int(tokens.shape[1]) // c
        out = np.full((batch * per_row, k, 2 * c), -1, dtype=np.int64)
        if out.shape[0]:
            queries = tokens[:, :per_row * c].detach().cpu().numpy().astype(np.int64).reshape(-1, c)
            ids = self._nearest(queries, k, exclude_own_document, per_row)
            found = ids >= 0
            chunks = self.store.chunks
            out[..., :c] = np.where(found[..., None], chunks[np.maximum(ids, 0)], -1)
            nxt = ids + 1
            has_next = found & (nxt < self.num_chunks)
            out[..., c:] = np.where(has_next[..., None], chunks[np.minimum(nxt, self.num_chunks - 1)], -1)
        return torch.from_numpy(out.reshape(batch, per_row, k, 2 * c))

    def _nearest(self, queries: np.ndarray, k: int, exclude_own_document: bool, per_row: int = 1) -> np.ndarray:
        """(Q, k) chunk ids, nearest first, -1 padded, none from the query's own document(s) if asked.

        Exact search masks those chunks out of its one score matrix; approximate
        search over-fetches, drops them, and widens the search for a query left
        with fewer than k.
        """
        vectors = self.encoder.encode(queries)
        own = None
        if exclude_own_document:
            query, chunk = self.store.table.matches(queries, self.store.chunks)
            follows = query % per_row != 0  # query q is the chunk after query q - 1 in the same row
            query, chunk = np.concatenate([query, query[follows] - 1]), np.concatenate([chunk, chunk[follows]])
            order = np.lexsort((chunk, query))
            own = OwnChunks.of(query[order], chunk[order], self.store.documents)
        if isinstance(self.index, ExactIndex):
            return self.index.search(vectors, k, own.positions() if own is not None else None)
        result = np.full((len(queries), k), -1, dtype=np.int64)
        pending = np.arange(len(queries))
        fetch = min(self.num_chunks, k + (OVERFETCH if own is not None and own.query.size else 0))
        while pending.size:
            ids = self.index.search(vectors[pending], fetch)
            keep = ids >= 0
            if own is not None:
                keep &= ~own.excludes(pending, ids)
            # the first k kept, in rank order: a stable sort puts kept candidates first
            rank = np.argsort(~keep, axis=1, kind="stable")[:, :k]
            chosen = np.take_along_axis(ids, rank, 1)
            chosen[~np.take_along_axis(keep, rank, 1)] = -1
            exhausted = (ids < 0).any(axis=1) | (fetch >= self.num_chunks)  # the index has nothing further
            done = (keep.sum(axis=1) >= k) | exhausted
            width = min(k, chosen.shape[1])
            result[pending[done], :width] = chosen[done, :width]
            pending = pending[~done]
            fetch = min(self.num_chunks, 2 * fetch)
        return result
