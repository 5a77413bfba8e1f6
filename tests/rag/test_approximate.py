"""Approximate search (faiss IVF-Flat) against exact search, and what happens without faiss."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from ava.errors import UserError
from ava.rag import Retriever, build_store
from tests.rag.corpus import CHUNK, EOS, encoder, packed_rows


def _without_faiss(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "faiss", None)  # `import faiss` now raises ImportError


def test_ivf_recall_against_exact_search_is_at_least_0_9(tmp_path):
    pytest.importorskip("faiss", reason="optional dependency: pip install faiss-cpu (or .[rag])")
    rows = packed_rows(3, documents=600)  # about 4,000 chunks
    build_store(rows, EOS, encoder(), tmp_path / "exact", CHUNK, "exact")
    info = build_store(rows, EOS, encoder(), tmp_path / "ivf", CHUNK, "approximate", nlist=32)
    assert info.search == "approximate" and info.nlist == 32
    queries = torch.from_numpy(packed_rows(99, documents=40)[:16])  # held out
    k = 8
    exact = Retriever.open(tmp_path / "exact").neighbours(queries, k)[..., :CHUNK]

    def recall(nprobe: int) -> float:
        approximate = Retriever.open(tmp_path / "ivf", nprobe=nprobe).neighbours(queries, k)[..., :CHUNK]
        found = 0
        for where in np.ndindex(exact.shape[:2]):
            truth = {tuple(n) for n in exact[where].tolist()}
            found += len(truth & {tuple(n) for n in approximate[where].tolist()})
        return found / (exact.shape[0] * exact.shape[1] * k)

    assert recall(16) >= 0.9
    assert recall(1) < 0.7  # one list of 32 scanned: nprobe reaches the index, and the search is approximate


def test_nlist_is_clipped_to_one_centroid_per_39_chunks(tmp_path):
    pytest.importorskip("faiss", reason="optional dependency: pip install faiss-cpu (or .[rag])")
    rows = packed_rows(0, documents=40)  # about 280 chunks
    info = build_store(rows, EOS, encoder(), tmp_path / "ivf", CHUNK, "approximate", nlist=1024)
    assert info.nlist == info.num_chunks // 39


def test_approximate_search_without_faiss_says_how_to_install_it(tmp_path, monkeypatch):
    _without_faiss(monkeypatch)
    with pytest.raises(UserError, match=r"pip install faiss-cpu \(or pip install -e \.\[rag\]\)"):
        build_store(packed_rows(0, documents=20), EOS, encoder(), tmp_path / "ivf", CHUNK, "approximate")
    assert not (tmp_path / "ivf").exists()


def test_exact_search_works_without_faiss(tmp_path, monkeypatch):
    _without_faiss(monkeypatch)
    rows = packed_rows(0, documents=20)
    build_store(rows, EOS, encoder(), tmp_path / "exact", CHUNK, "exact")
    got = Retriever.open(tmp_path / "exact").neighbours(torch.from_numpy(rows[:2]), k=2)
    assert got.shape == (2, 4, 2, 2 * CHUNK) and (got[..., :CHUNK] >= 0).all()
