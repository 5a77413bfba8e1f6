"""The store on disk: never overwritten by accident, and a damaged file is a user error that names it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ava.errors import UserError
from ava.rag import Retriever, build_store, data_fingerprint, encoder_fingerprint
from tests.rag.corpus import CHUNK, EOS, encoder, packed_rows


@pytest.fixture
def rows() -> np.ndarray:
    return packed_rows(0, documents=30)


def test_manifest_records_the_build(tmp_path, rows):
    table = torch.randn(EOS + 1, 48, generator=torch.Generator().manual_seed(7))
    info = build_store(rows, EOS, encoder(), tmp_path / "s", CHUNK, "exact")
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["version"] == 1 and manifest["chunk_size"] == CHUNK
    assert manifest["num_chunks"] == info.num_chunks == rows.size // CHUNK
    documents = int((rows == EOS).sum()) + int(rows[-1, -1] != EOS)  # the last may have lost its eos to packing
    assert manifest["num_documents"] == info.num_documents == documents
    assert manifest["data_fingerprint"] == data_fingerprint(rows)
    assert manifest["encoder"]["fingerprint"] == encoder_fingerprint(table)
    assert manifest["encoder"]["kind"] == "embedding" and manifest["encoder"]["dim"] == 32
    assert manifest["search"]["kind"] == "exact" and "created" in manifest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]  # no temporary directory left beside it


def test_an_existing_store_is_refused_without_force_and_replaced_with_it(tmp_path, rows):
    build_store(rows, EOS, encoder(), tmp_path / "s", CHUNK, "exact")
    before = (tmp_path / "s" / "manifest.json").read_text()
    with pytest.raises(UserError, match="already holds a retrieval store.*\n  Fix: pass --force"):
        build_store(rows[:10], EOS, encoder(), tmp_path / "s", CHUNK, "exact")
    assert (tmp_path / "s" / "manifest.json").read_text() == before
    info = build_store(rows[:10], EOS, encoder(), tmp_path / "s", CHUNK, "exact", force=True)
    assert info.num_chunks == 10 * rows.shape[1] // CHUNK
    assert Retriever.open(tmp_path / "s").num_chunks == info.num_chunks
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


def test_force_never_replaces_a_directory_that_is_not_a_store(tmp_path, rows):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="holds no retrieval store"):
        build_store(rows, EOS, encoder(), tmp_path / "mine", CHUNK, "exact", force=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def _truncate(path):
    path.write_bytes(path.read_bytes()[:-100])


def _scramble_header(path):
    data = bytearray(path.read_bytes())
    data[:16] = b"\x00" * 16
    path.write_bytes(bytes(data))


def _bad_json(path):
    path.write_text(path.read_text()[:40])


@pytest.mark.parametrize(("name", "damage", "says"), [
    ("chunks.npy", _truncate, "truncated"),
    ("embeddings.npy", _scramble_header, "numpy cannot read it"),
    ("documents.npy", lambda p: p.unlink(), "it is missing"),
    ("manifest.json", _bad_json, "not valid JSON"),
    ("manifest.json", lambda p: p.unlink(), "has no manifest.json"),
])
def test_a_damaged_store_file_is_a_user_error_naming_it(tmp_path, rows, name, damage, says):
    build_store(rows, EOS, encoder(), tmp_path / "s", CHUNK, "exact")
    damage(tmp_path / "s" / name)
    with pytest.raises(UserError) as caught:
        Retriever.open(tmp_path / "s")
    message = str(caught.value)
    assert says in message
    assert str(tmp_path / "s" / name) in message or (name == "manifest.json" and str(tmp_path / "s") in message)
    assert "ava rag build-index" in message and "--force" in message


def test_a_corrupt_faiss_index_is_a_user_error_naming_it(tmp_path, rows):
    pytest.importorskip("faiss", reason="optional dependency: pip install faiss-cpu (or .[rag])")
    build_store(rows, EOS, encoder(), tmp_path / "s", CHUNK, "approximate", nlist=4)
    path = tmp_path / "s" / "index.faiss"
    path.write_bytes(b"\x00" * path.stat().st_size)  # same size: only faiss can tell
    with pytest.raises(UserError, match=f"{path} is unusable: faiss cannot read it"):
        Retriever.open(tmp_path / "s")


def test_a_store_of_another_format_version_is_refused(tmp_path, rows):
    build_store(rows, EOS, encoder(), tmp_path / "s", CHUNK, "exact")
    manifest_path = tmp_path / "s" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["version"] = 99
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="format version 99, this Ava reads version 1"):
        Retriever.open(tmp_path / "s")


def test_verify_catches_a_changed_byte_that_keeps_the_size(tmp_path, rows):
    build_store(rows, EOS, encoder(), tmp_path / "s", CHUNK, "exact")
    path = tmp_path / "s" / "chunks.npy"
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    Retriever.open(tmp_path / "s")  # sizes and shapes still fit
    with pytest.raises(UserError, match=f"{path} is unusable: its contents differ"):
        Retriever.open(tmp_path / "s", verify=True)


def test_check_refuses_a_store_built_for_other_data_or_another_encoder(tmp_path, rows):
    build_store(rows, EOS, encoder(), tmp_path / "s", CHUNK, "exact")
    retriever = Retriever.open(tmp_path / "s")
    retriever.check(chunk_size=CHUNK, data_fingerprint=data_fingerprint(rows))
    with pytest.raises(UserError, match="another data"):
        retriever.check(data_fingerprint=data_fingerprint(rows[:5]))
    with pytest.raises(UserError, match="another encoder"):
        retriever.check(encoder_fingerprint=encoder_fingerprint(torch.zeros(3, 3)))
    with pytest.raises(UserError, match="another chunk_size"):
        retriever.check(chunk_size=2 * CHUNK)
