"""The retrieval datastore on disk: built from the packed training rows, written atomically, read back checked.

A store directory holds
- `manifest.json`: format version, chunk size, counts, encoder and data
  fingerprints, search settings, creation time, and each file's size and sha256;
- `chunks.npy` (M, c) int32: the training stream cut into chunks; a neighbour
  is chunk i followed by chunk i+1, its continuation;
- `documents.npy` (M, 2) int64: the first and last document each chunk overlaps;
- `hashes.npy`, `hash_order.npy`: the exact-match table (`ava.rag.own_document`);
- the encoder's files (`encoder_table.npy` for the token-embedding encoder);
- the index: `embeddings.npy` (exact) or `index.faiss` (approximate).

It is written into a temporary directory beside the target and renamed into
place, so a store that exists is complete; an existing store is replaced only
with `force=True`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from ava import __version__
from ava.errors import UserError
from ava.rag.chunks import chunk_documents, cut_chunks, data_fingerprint
from ava.rag.encoder import EMBEDDING, HF, TABLE_FILE, ChunkEncoder, describe
from ava.rag.index import APPROXIMATE, EXACT, EXACT_FILE, FAISS_FILE, build_index
from ava.rag.own_document import ExactMatchTable

FORMAT = "ava-rag-store"
VERSION = 1
MANIFEST = "manifest.json"
CHUNKS_FILE = "chunks.npy"
DOCUMENTS_FILE = "documents.npy"
HASHES_FILE = "hashes.npy"
ORDER_FILE = "hash_order.npy"


@dataclass(frozen=True)
class StoreInfo:
    """What a build made, for the summary line."""

    path: Path
    num_chunks: int
    num_documents: int
    num_tokens: int
    chunk_size: int
    dim: int
    search: str
    nlist: int | None
    encoder: str
    bytes_on_disk: int
    seconds: float
    data_fingerprint: str

    def describe(self) -> str:
        index = f"approximate (faiss IVF-Flat, nlist {self.nlist})" if self.search == APPROXIMATE else "exact"
        return (f"{self.num_chunks:,} chunks of {self.chunk_size} tokens from {self.num_documents:,} documents "
                f"({self.num_tokens:,} tokens); encoder {self.encoder}, dim {self.dim}; index {index}; "
                f"{self.bytes_on_disk / 2**20:.1f} MiB on disk; built in {self.seconds:.1f} s; {self.path}")


def rebuild_fix(directory: Path) -> str:
    return (f"rebuild it with `ava rag build-index --config ... --output {directory} --force` "
            "(the same config as the training run)")


def build_store(rows: np.ndarray, eos_id: int | None, encoder: ChunkEncoder, out_dir: str | Path, chunk_size: int,
                search: str = EXACT, nlist: int = 1024, force: bool = False) -> StoreInfo:
    """Build the datastore of the packed training `rows` (N, L) into `out_dir`.

    `eos_id` delimits documents in the stream (None: each row is a document).
    Refuses an existing store unless `force`, and never replaces a non-empty
    directory that is not a store.
    """
    started = time.perf_counter()
    out_dir = Path(out_dir).expanduser()
    refuse_existing(out_dir, force)
    if search not in (EXACT, APPROXIMATE):
        raise UserError(f"rag.search = {search!r} is not a search kind", "use 'exact' or 'approximate'")
    chunks = cut_chunks(rows, chunk_size)
    documents = chunk_documents(rows, chunk_size, eos_id)
    table = ExactMatchTable.build(chunks)
    vectors = encoder.encode(chunks)
    index = build_index(vectors, search, nlist)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    building = out_dir.parent / f".{out_dir.name}.building-{os.getpid()}"
    shutil.rmtree(building, ignore_errors=True)
    building.mkdir()
    try:
        np.save(building / CHUNKS_FILE, chunks)
        np.save(building / DOCUMENTS_FILE, documents)
        np.save(building / HASHES_FILE, table.hashes)
        np.save(building / ORDER_FILE, table.order)
        encoder_entry = encoder.save(building)
        search_entry = index.save(building)
        num_documents = int(documents[-1, 1] - documents[0, 0] + 1)
        fingerprint = data_fingerprint(rows)
        manifest = {
            "format": FORMAT, "version": VERSION, "ava_version": __version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "chunk_size": chunk_size, "row_length": int(rows.shape[1]), "num_rows": int(rows.shape[0]),
            "num_chunks": len(chunks), "num_documents": num_documents, "num_tokens": int(chunks.size),
            "eos_id": eos_id, "data_fingerprint": fingerprint, "encoder": encoder_entry,
            "search": {**search_entry, "requested_nlist": nlist if search == APPROXIMATE else None},
            "files": {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(building.iterdir())},
        }
        _write_json(building / MANIFEST, manifest)
        _put_in_place(building, out_dir)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    size = sum(p.stat().st_size for p in out_dir.iterdir())
    return StoreInfo(out_dir, len(chunks), num_documents, int(chunks.size), chunk_size, encoder.dim, search,
                     search_entry.get("nlist"), describe(encoder_entry), size, time.perf_counter() - started,
                     fingerprint)


def refuse_existing(out_dir: Path, force: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir} is a file, not a directory for a retrieval store",
                        "choose another --output (rag.index_dir)")
    if not out_dir.is_dir() or not any(out_dir.iterdir()):
        return
    is_store = (out_dir / MANIFEST).is_file()
    if not is_store:
        raise UserError(f"{out_dir} is not empty and holds no retrieval store ({MANIFEST}), so it is left alone, "
                        "even with --force", "choose an empty or new directory for --output (rag.index_dir)")
    if not force:
        raise UserError(f"{out_dir} already holds a retrieval store; a build never overwrites one",
                        "pass --force to rebuild it, or --output another directory")


def _put_in_place(building: Path, out_dir: Path) -> None:
    """Rename the finished store into place; an old store moves aside first and is deleted only after."""
    old = None
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.replaced-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(out_dir, old)
    try:
        os.rename(building, out_dir)
    except OSError:
        if old is not None:
            os.rename(old, out_dir)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class StoreFiles:
    """A store read back and checked against its manifest."""

    directory: Path
    manifest: dict[str, Any]
    chunks: np.ndarray
    documents: np.ndarray
    table: ExactMatchTable
    encoder_table: np.ndarray | None  # the embedding encoder's projected table
    vectors: np.ndarray | None  # exact search: the chunk vectors


def read_store(directory: str | Path, verify: bool = False) -> StoreFiles:
    """Read and check a store; a missing, truncated or corrupt file is a UserError naming it.

    `verify` also compares every file's sha256 with the manifest (reads it all once).
    """
    directory = Path(directory).expanduser()
    if not directory.is_dir():
        raise UserError(f"there is no retrieval store at {directory}",
                        "build it with `ava rag build-index --config ...` (the training run's config), "
                        "or point rag.index_dir at an existing store")
    manifest = _read_manifest(directory)
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise _corrupt(directory / MANIFEST, "it lists no files")
    for name, entry in files.items():
        path = directory / name
        if not path.is_file():
            raise _corrupt(path, "it is missing")
        size = path.stat().st_size
        if size != entry.get("bytes"):
            raise _corrupt(path, f"it has {size} bytes, the manifest says {entry.get('bytes')} (truncated or changed)")
        if verify and _sha256(path) != entry.get("sha256"):
            raise _corrupt(path, "its contents differ from the sha256 in the manifest")
    try:
        m, c = int(manifest["num_chunks"]), int(manifest["chunk_size"])
        encoder, search = manifest["encoder"], manifest["search"]
        dim, encoder_kind, search_kind = int(encoder["dim"]), encoder["kind"], search["kind"]
    except (KeyError, TypeError, ValueError) as exc:
        raise _corrupt(directory / MANIFEST, f"its entries are malformed ({exc!r})") from exc
    if encoder_kind not in (EMBEDDING, HF) or search_kind not in (EXACT, APPROXIMATE):
        raise _corrupt(directory / MANIFEST, f"unknown encoder {encoder_kind!r} or search {search_kind!r}")
    chunks = _array(directory, CHUNKS_FILE, files, (m, c), np.int32)
    documents = _array(directory, DOCUMENTS_FILE, files, (m, 2), np.int64)
    table = ExactMatchTable(_array(directory, HASHES_FILE, files, (m,), np.uint64),
                            _array(directory, ORDER_FILE, files, (m,), np.int64))
    encoder_table = _array(directory, TABLE_FILE, files, (None, dim), np.float32) if encoder_kind == EMBEDDING else None
    vectors = _array(directory, EXACT_FILE, files, (m, dim), np.float32) if search_kind == EXACT else None
    if search_kind == APPROXIMATE and FAISS_FILE not in files:
        raise _corrupt(directory / MANIFEST, f"it lists no {FAISS_FILE}")
    return StoreFiles(directory, manifest, chunks, documents, table, encoder_table, vectors)


def _read_manifest(directory: Path) -> dict[str, Any]:
    path = directory / MANIFEST
    if not path.is_file():
        raise UserError(f"{directory} has no {MANIFEST}: it is not a retrieval store, or its build was interrupted",
                        rebuild_fix(directory))
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _corrupt(path, f"it is not valid JSON ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise _corrupt(path, f"it is not an {FORMAT} manifest")
    if manifest.get("version") != VERSION:
        raise UserError(f"{path}: the store has format version {manifest.get('version')}, this Ava reads "
                        f"version {VERSION}", rebuild_fix(directory))
    missing = [k for k in ("num_chunks", "chunk_size", "encoder", "search", "data_fingerprint") if k not in manifest]
    if missing:
        raise _corrupt(path, f"it lacks {', '.join(missing)}")
    return manifest


def _array(directory: Path, name: str, files: dict[str, Any], shape: tuple[int | None, ...], dtype: Any) -> np.ndarray:
    path = directory / name
    if name not in files:
        raise _corrupt(directory / MANIFEST, f"it lists no {name}")
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise _corrupt(path, f"numpy cannot read it ({exc})") from exc
    fits = array.ndim == len(shape) and all(want is None or got == want for got, want in zip(array.shape, shape, strict=True))
    if not fits or array.dtype != np.dtype(dtype):
        raise _corrupt(path, f"it holds {array.dtype} {tuple(array.shape)}, expected {np.dtype(dtype)} "
                       f"{tuple('*' if s is None else s for s in shape)}")
    return array


def _corrupt(path: Path, why: str) -> UserError:
    return UserError(f"retrieval store file {path} is unusable: {why}", rebuild_fix(path.parent))
