"""Retrieval: near-duplicates found, the query's own document left out, continuations, padding, faiss recall."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ava.data.packing import pack_documents
from ava.rag import Retriever, build_store, chunk_documents
from tests.rag.corpus import CHUNK, EOS, encoder, near_copy, packed_rows, whole_document_chunks

PER_ROW = 4  # chunks per row of packed_rows


def _has_faiss() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


# Approximate search with nlist 4 and nprobe 16 scans every list: the answers of exact search, by another path.
SEARCH = ["exact", pytest.param("approximate", marks=pytest.mark.skipif(not _has_faiss(), reason="needs faiss-cpu"))]


@pytest.fixture(scope="module", params=SEARCH)
def planted(request, tmp_path_factory):
    """A store whose chunk `b` is a near copy of chunk `a` from another document, and the rows it was built from."""
    rows = packed_rows(0)
    chunks = rows.reshape(-1, CHUNK)  # a view: planting into it edits the rows
    documents = chunk_documents(rows, CHUNK, EOS)
    inside = whole_document_chunks(rows)
    a = int(inside[5])
    b = int(next(i for i in inside[len(inside) // 2:] if documents[i, 0] != documents[a, 0]))
    chunks[b] = near_copy(chunks[a], seed=1)
    directory = tmp_path_factory.mktemp("planted") / "store"
    build_store(rows, EOS, encoder(), directory, CHUNK, request.param, nlist=4)
    return rows, a, b, Retriever.open(directory)


def _chunk_ids(rows: np.ndarray, neighbours: torch.Tensor) -> np.ndarray:
    """The stored chunk index of each neighbour (random tokens: every chunk is unique), -1 for none."""
    index = {row.tobytes(): i for i, row in enumerate(rows.reshape(-1, CHUNK))}
    heads = neighbours[..., :CHUNK].numpy()
    flat = [index.get(h.tobytes(), -1) if h[0] >= 0 else -1 for h in heads.reshape(-1, CHUNK)]
    return np.array(flat).reshape(heads.shape[:-1])


def test_exact_search_finds_the_planted_near_duplicate_of_a_held_out_chunk(planted):
    rows, a, b, retriever = planted
    query = packed_rows(5, documents=10)[:1].copy()  # held out: not in the store
    query[0, :CHUNK] = near_copy(rows.reshape(-1, CHUNK)[b], seed=2)
    got = retriever.neighbours(torch.from_numpy(query), k=2)
    assert got.shape == (1, PER_ROW, 2, 2 * CHUNK)
    assert _chunk_ids(rows, got)[0, 0, 0] == b


def test_a_training_chunk_never_gets_its_own_document_back(planted):
    rows, a, b, retriever = planted
    row = a // PER_ROW
    batch = rows[[row, 1, 2, 40, 41, 80, 81, 82]]
    got = _chunk_ids(rows, retriever.neighbours(torch.from_numpy(batch), k=4))
    documents = chunk_documents(rows, CHUNK, EOS)
    query_ids = np.array([[r * PER_ROW + j for j in range(PER_ROW)] for r in (row, 1, 2, 40, 41, 80, 81, 82)])
    first, last = documents[query_ids][..., 0, None], documents[query_ids][..., 1, None]
    assert (got >= 0).all()
    overlaps = (documents[got][..., 0] <= last) & (documents[got][..., 1] >= first)
    assert not overlaps.any()
    # The nearest chunk to `a` is `a` itself; with its document excluded, the near copy in the other document wins.
    assert got[0, a % PER_ROW, 0] == b
    unfiltered = _chunk_ids(rows, retriever.neighbours(torch.from_numpy(batch), k=4, exclude_own_document=False))
    assert unfiltered[0, a % PER_ROW, 0] == a


def test_a_held_out_chunk_gets_the_near_duplicate_even_from_a_document_it_resembles(planted):
    rows, a, b, retriever = planted
    query = rows[a // PER_ROW: a // PER_ROW + 1].copy()
    query[0, (a % PER_ROW) * CHUNK:(a % PER_ROW + 1) * CHUNK] = near_copy(rows.reshape(-1, CHUNK)[a], seed=3)
    after = (a % PER_ROW + 1) * CHUNK  # the chunks after it are new text too (were they stored, see below)
    query[0, after:] = np.random.default_rng(4).integers(0, EOS, query.shape[1] - after)
    got = _chunk_ids(rows, retriever.neighbours(torch.from_numpy(query), k=2))
    assert got[0, a % PER_ROW, 0] == a  # neither the changed chunk nor the next is in the store: nothing excluded
    if a % PER_ROW < PER_ROW - 1:
        # With the next chunk verbatim from a's document, a's document is excluded: a's continuation is exactly
        # what the positions reading these neighbours predict.
        query[0, after:after + CHUNK] = rows.reshape(-1, CHUNK)[a + 1]
        got = _chunk_ids(rows, retriever.neighbours(torch.from_numpy(query), k=4))[0, a % PER_ROW]
        documents = chunk_documents(rows, CHUNK, EOS)
        assert (got >= 0).all() and not (documents[got] == documents[a + 1, 0]).any(), got


def test_each_neighbour_is_its_chunk_followed_by_the_next_chunk(planted):
    rows, a, b, retriever = planted
    got = retriever.neighbours(torch.from_numpy(rows[a // PER_ROW: a // PER_ROW + 2]), k=3)
    ids = _chunk_ids(rows, got)
    stream = rows.reshape(-1)
    assert (ids >= 0).all() and (ids < len(stream) // CHUNK - 1).all()
    for where in np.ndindex(ids.shape):
        i = ids[where]
        assert got[where].tolist() == stream[i * CHUNK:(i + 2) * CHUNK].tolist()


def test_too_few_neighbours_are_padded_with_minus_one(tmp_path):
    rows = np.random.default_rng(0).integers(0, EOS, (1, 3 * CHUNK))  # 3 chunks, no eos: one document
    build_store(rows, None, encoder(), tmp_path / "s", CHUNK, "exact")
    retriever = Retriever.open(tmp_path / "s")
    held_out = torch.from_numpy(np.random.default_rng(1).integers(0, EOS, (2, CHUNK + 5)))
    got = retriever.neighbours(held_out, k=5)
    assert got.shape == (2, 1, 5, 2 * CHUNK)  # the partial trailing chunk is not queried
    assert (got[:, :, :3, :CHUNK] >= 0).all()
    assert (got[:, :, 3:] == -1).all()
    last = _chunk_ids(rows, got) == 2
    assert (got[last][:, CHUNK:] == -1).all() and (got[last][:, :CHUNK] >= 0).all()  # the stream ends after chunk 2
    own = retriever.neighbours(torch.from_numpy(rows), k=2)  # every stored chunk is the query's own document
    assert (own == -1).all()


@pytest.mark.parametrize("search", SEARCH)
def test_a_chunk_never_gets_the_document_of_the_chunk_its_readers_predict(tmp_path, search):
    # Document A ends exactly on a chunk boundary, so chunk 1 of the row is the start of document B. Chunk 0's
    # neighbours are read by the positions that predict chunk 1: document B must be excluded as well as A.
    rng = np.random.default_rng(3)
    a, b = rng.integers(0, EOS, CHUNK - 1), rng.integers(0, EOS, 6 * CHUNK)
    rows = pack_documents([a, b], 2 * CHUNK, EOS)
    build_store(rows, EOS, encoder(), tmp_path / "s", CHUNK, search, nlist=2)
    retriever = Retriever.open(tmp_path / "s")
    got = _chunk_ids(rows, retriever.neighbours(torch.from_numpy(rows[:1]), k=rows.size // CHUNK))
    assert (got[0, 0] == -1).all(), got[0, 0]  # every stored chunk is A's or B's
    assert set(got[0, 1].tolist()) == {0, -1}  # chunk 1, B's, may read A (its readers predict past the row)


@pytest.mark.parametrize("search", SEARCH)
def test_k_neighbours_survive_an_own_document_nearer_than_k_plus_8_chunks(tmp_path, search):
    rng = np.random.default_rng(4)
    base = rng.integers(0, EOS, CHUNK)
    # Document 0 is 20 chunks, each nearer to `base` than anything else: more than k + 8 own-document hits.
    own = np.concatenate([near_copy(base, seed=s, changed=1) for s in range(20)])[:-1]
    other = np.concatenate([near_copy(base, seed=99, changed=3), rng.integers(0, EOS, 3 * CHUNK - 1)])
    rows = pack_documents([own, other, rng.integers(0, EOS, 4 * CHUNK - 1)], 4 * CHUNK, EOS)
    assert rows.shape == (7, 4 * CHUNK)
    build_store(rows, EOS, encoder(), tmp_path / "s", CHUNK, search, nlist=4)
    got = _chunk_ids(rows, Retriever.open(tmp_path / "s").neighbours(torch.from_numpy(rows[:1]), k=1))
    assert got[0, 0, 0] == 20  # the first chunk of document 1, the nearest outside document 0
