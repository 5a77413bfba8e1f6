"""Small packed corpora of random tokens, with near-duplicate chunks planted where a test needs them."""

from __future__ import annotations

import numpy as np
import torch

from ava.data.packing import pack_documents
from ava.rag import EmbeddingEncoder, chunk_documents

EOS = 256  # the byte tokenizer's end of text
CHUNK = 16


def packed_rows(seed: int, documents: int = 120, length: int = 4 * CHUNK) -> np.ndarray:
    """Random-token documents (no eos inside) packed into (N, length) rows joined by EOS."""
    rng = np.random.default_rng(seed)
    docs = [rng.integers(0, EOS, int(rng.integers(20, 200))) for _ in range(documents)]
    return pack_documents(docs, length, EOS)


def encoder(dim: int = 32) -> EmbeddingEncoder:
    """A fixed random token embedding (257 x 48) projected to `dim`."""
    return EmbeddingEncoder.from_embedding(torch.randn(EOS + 1, 48, generator=torch.Generator().manual_seed(7)), dim)


def whole_document_chunks(rows: np.ndarray, chunk: int = CHUNK) -> np.ndarray:
    """Indices of chunks that hold no eos and lie inside one document."""
    chunks = rows.reshape(-1, chunk)
    docs = chunk_documents(rows, chunk, EOS)
    return np.flatnonzero((docs[:, 0] == docs[:, 1]) & ~(chunks == EOS).any(axis=1))


def near_copy(chunk: np.ndarray, seed: int, changed: int = 2) -> np.ndarray:
    """`chunk` with `changed` tokens replaced by other non-eos tokens."""
    rng = np.random.default_rng(seed)
    out = chunk.copy()
    where = rng.choice(chunk.size, changed, replace=False)
    out[where] = (out[where] + 1 + rng.integers(0, EOS - 1, changed)) % EOS
    return out
