"""Chunk encoders: token chunks to unit-length float32 vectors, the same at build and at query time.

`EmbeddingEncoder` mean-pools rows of a table: the model's own frozen token
embedding, randomly projected to `encoder_dim` when it is wider.  Mean pooling
is linear, so projecting the table once equals projecting every chunk's mean.
The store saves the projected table, so queries use exactly the encoder the
store was built with, whatever the model's embedding has become since.

`HFEncoder` decodes each chunk to text with Ava's tokenizer and mean-pools the
last hidden state of a local Hugging Face encoder (a frozen BERT, as in RETRO).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from ava.errors import UserError

EMBEDDING = "embedding"
HF = "hf"
TABLE_FILE = "encoder_table.npy"
PROJECTION_SEED = 0  # the fixed seed of the random projection
_BLOCK = 8192  # chunks encoded at a time by the embedding encoder
_HF_BATCH = 64  # chunks per forward of a Hugging Face encoder

Decode = Callable[[list[int]], str]


class ChunkEncoder(Protocol):
    """What a store needs from an encoder."""

    kind: str  # EMBEDDING or HF
    dim: int

    @property
    def fingerprint(self) -> str: ...

    def encode(self, chunks: np.ndarray) -> np.ndarray:
        """(M, c) token ids -> (M, dim) float32 rows of unit length."""
        ...

    def save(self, directory: Path) -> dict[str, Any]:
        """Write what queries need into the store's directory; returns the manifest's `encoder` entry."""
        ...


def encoder_fingerprint(table: torch.Tensor | np.ndarray) -> str:
    """sha256 of a float table (as float32) and its shape: which embedding a store's encoder was made from."""
    array = table.detach().cpu().float().numpy() if isinstance(table, torch.Tensor) else np.asarray(table, np.float32)
    digest = hashlib.sha256(f"{tuple(array.shape)}".encode())
    digest.update(np.ascontiguousarray(array, dtype=np.float32).data.cast("B"))
    return digest.hexdigest()


def _unit(x: torch.Tensor) -> np.ndarray:
    return torch.nn.functional.normalize(x.float(), dim=-1).numpy().astype(np.float32, copy=False)


class EmbeddingEncoder:
    """Mean of (projected) token-embedding rows."""

    kind = EMBEDDING

    def __init__(self, table: np.ndarray, source_fingerprint: str, source_dim: int) -> None:
        self.table = torch.from_numpy(np.ascontiguousarray(table, dtype=np.float32))
        self.dim = int(table.shape[1])
        self._fingerprint = source_fingerprint
        self.source_dim = source_dim

    @classmethod
    def from_embedding(cls, table: torch.Tensor, encoder_dim: int = 256) -> EmbeddingEncoder:
        """From the model's (V, D) token embedding: projected by a seeded Gaussian (D, dim) / sqrt(dim) when D > dim."""
        if table.ndim != 2:
            raise UserError(f"the token embedding has shape {tuple(table.shape)}, expected (vocab, hidden)",
                            "pass the model's embed_tokens.weight")
        if encoder_dim < 1:
            raise UserError(f"rag.encoder_dim = {encoder_dim} must be positive", "set rag.encoder_dim, e.g. 256")
        source = table.detach().cpu().float()
        projected = source
        if source.shape[1] > encoder_dim:
            generator = torch.Generator().manual_seed(PROJECTION_SEED)
            projection = torch.randn(source.shape[1], encoder_dim, generator=generator) / encoder_dim ** 0.5
            projected = source @ projection
        return cls(projected.numpy(), encoder_fingerprint(source), int(source.shape[1]))

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    def encode(self, chunks: np.ndarray) -> np.ndarray:
        ids = torch.from_numpy(np.asarray(chunks, dtype=np.int64))
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.table.shape[0]):
            raise UserError(f"a chunk holds token id {int(ids.max()) if int(ids.min()) >= 0 else int(ids.min())}, "
                            f"outside the encoder's vocabulary of {self.table.shape[0]}",
                            "query with the tokenizer the store was built with, or rebuild the store")
        out = np.empty((ids.shape[0], self.dim), dtype=np.float32)
        for start in range(0, ids.shape[0], _BLOCK):
            mean = torch.nn.functional.embedding_bag(ids[start:start + _BLOCK], self.table, mode="mean")
            out[start:start + _BLOCK] = _unit(mean)
        return out

    def save(self, directory: Path) -> dict[str, Any]:
        np.save(directory / TABLE_FILE, self.table.numpy())
        return {"kind": EMBEDDING, "dim": self.dim, "fingerprint": self.fingerprint, "source_dim": self.source_dim,
                "projection_seed": PROJECTION_SEED, "file": TABLE_FILE}


class HFEncoder:
    """Mean-pooled last hidden state of a local Hugging Face encoder over each chunk's decoded text."""

    kind = HF

    def __init__(self, path: str | Path, decode: Decode, max_tokens: int = 512) -> None:
        directory = Path(path).expanduser()
        if not (directory / "config.json").is_file():
            raise UserError(f"rag.encoder = {path}: no Hugging Face model there (no config.json)",
                            "point rag.encoder at a local directory saved with save_pretrained (model and "
                            "tokenizer), or use rag.encoder: embedding")
        from transformers import AutoModel, AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
            self.model = AutoModel.from_pretrained(directory, local_files_only=True).eval()
        except (OSError, ValueError) as exc:
            raise UserError(f"rag.encoder = {path} could not be loaded: {exc}",
                            "save both the model and its tokenizer there with save_pretrained") from exc
        self.path = directory.resolve()
        self.decode = decode
        self.max_tokens = min(max_tokens, int(getattr(self.model.config, "max_position_embeddings", max_tokens)))
        self.dim = int(self.model.config.hidden_size)
        self._fingerprint = _model_fingerprint(self.model.state_dict())

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    @torch.no_grad()
    def encode(self, chunks: np.ndarray) -> np.ndarray:
        out = np.empty((len(chunks), self.dim), dtype=np.float32)
        for start in range(0, len(chunks), _HF_BATCH):
            texts = [self.decode([int(t) for t in row if t >= 0]) for row in chunks[start:start + _HF_BATCH]]
            inputs = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_tokens,
                                    return_tensors="pt")
            hidden = self.model(**inputs).last_hidden_state
            mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            out[start:start + _HF_BATCH] = _unit((hidden * mask).sum(1) / mask.sum(1).clamp(min=1))
        return out

    def save(self, directory: Path) -> dict[str, Any]:
        return {"kind": HF, "dim": self.dim, "fingerprint": self.fingerprint, "path": str(self.path)}


def _model_fingerprint(state: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].detach().cpu().float().contiguous().numpy().data.cast("B"))
    return digest.hexdigest()


def load_encoder(directory: Path, entry: dict[str, Any], decode: Decode | None, table: np.ndarray | None) -> ChunkEncoder:
    """The encoder a store was built with, from its manifest `entry` (and its table file, already read)."""
    if entry.get("kind") == EMBEDDING:
        assert table is not None
        return EmbeddingEncoder(table, str(entry["fingerprint"]), int(entry["source_dim"]))
    if decode is None:
        raise UserError(f"the store in {directory} encodes chunks with the Hugging Face encoder {entry.get('path')}, "
                        "which reads text, and no tokenizer was given to turn token ids into text",
                        "pass decode= (the data tokenizer's decode) to Retriever.open")
    encoder = HFEncoder(str(entry["path"]), decode)
    if encoder.fingerprint != entry.get("fingerprint"):
        raise UserError(f"the Hugging Face encoder in {entry['path']} has changed since the store in {directory} "
                        "was built, so queries would not match the stored vectors",
                        f"rebuild the store with `ava rag build-index ... --force`, or restore {entry['path']}")
    return encoder


def describe(entry: dict[str, Any]) -> str:
    """One phrase for a manifest's encoder entry."""
    if entry.get("kind") == EMBEDDING:
        return f"token embedding ({entry['source_dim']} -> {entry['dim']})"
    return f"Hugging Face encoder {entry.get('path')} ({entry.get('dim')})"
