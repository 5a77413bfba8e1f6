"""Retrieval augmentation (RETRO): the datastore of training chunks and the retriever that queries it.

- `chunks`: the training stream cut into chunks; their documents and hashes.
- `encoder`: chunk -> unit vector (the model's frozen token embedding, or a local HF encoder).
- `index`: nearest chunks, exact (matmul) or approximate (faiss IVF-Flat).
- `own_document`: which neighbours come from the query's own document.
- `store`: build a store atomically, read one back checked.
- `retriever`: `Retriever.open(dir).neighbours(tokens, k)`.
- `run_store`: a training run's store: where it is, building it from the run's config.

`ava rag build-index` (ava.cli.rag_cmd) builds a store from a training config.
"""

from __future__ import annotations

from ava.rag.chunks import chunk_documents, cut_chunks, data_fingerprint
from ava.rag.encoder import ChunkEncoder, EmbeddingEncoder, HFEncoder, encoder_fingerprint
from ava.rag.retriever import Retriever
from ava.rag.store import StoreInfo, build_store

__all__ = ["ChunkEncoder", "EmbeddingEncoder", "HFEncoder", "Retriever", "StoreInfo", "build_store",
           "chunk_documents", "cut_chunks", "data_fingerprint", "encoder_fingerprint"]
