"""Packing documents into full rows separated by the end-of-document id."""

from __future__ import annotations

import numpy as np
import pytest

from ava.data.packing import pack_documents, pack_stream
from ava.errors import UserError

EOS = 99


def test_documents_are_joined_with_eos_and_cut_into_full_rows() -> None:
    packed = pack_documents([[1, 2, 3], [4, 5], [6]], max_length=4, eos_id=EOS)
    # stream: 1 2 3 E 4 5 E 6 E  -> two rows of 4, the trailing "E" dropped
    np.testing.assert_array_equal(packed, [[1, 2, 3, EOS], [4, 5, EOS, 6]])
    assert packed.dtype == np.int64


def test_final_partial_row_is_dropped() -> None:
    assert pack_documents([[1, 2, 3]], max_length=8, eos_id=EOS).shape == (0, 8)
    assert pack_documents([], max_length=8, eos_id=EOS).shape == (0, 8)


def test_packing_keeps_every_token_in_order_up_to_the_cut() -> None:
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 50, size=int(n)).tolist() for n in rng.integers(0, 30, size=40)]
    packed = pack_documents(iter(docs), max_length=16, eos_id=EOS)  # any iterable, consumed once
    stream = [t for doc in docs for t in [*doc, EOS]]
    assert packed.shape == (len(stream) // 16, 16)
    assert packed.reshape(-1).tolist() == stream[: packed.size]


def _stream_docs(count: int, seed: int = 0) -> list[str | None]:
    """Texts of random lengths (some empty or None, which packing skips); byte ids are the characters."""
    rng = np.random.default_rng(seed)
    docs: list[str | None] = []
    for i in range(count):
        n = int(rng.integers(0, 40))
        docs.append(None if i % 11 == 5 else "".join(chr(97 + int(c)) for c in rng.integers(0, 26, size=n)))
    return docs


def _bytes(texts) -> list[np.ndarray]:
    return [np.frombuffer(t.encode(), dtype=np.uint8).astype(np.int64) for t in texts]


def test_pack_stream_makes_the_rows_pack_documents_makes() -> None:
    docs = _stream_docs(60)
    rows = [row for row, _ in pack_stream(iter(docs), _bytes, max_length=16, eos_id=EOS, chunk=7)]
    expected = pack_documents(_bytes(d for d in docs if d), max_length=16, eos_id=EOS)
    np.testing.assert_array_equal(np.stack(rows), expected)


def test_pack_stream_resumes_from_any_position_with_the_same_rows() -> None:
    docs = _stream_docs(60, seed=1)
    full = list(pack_stream(docs, _bytes, max_length=16, eos_id=EOS, chunk=5))
    for cut in range(len(full)):
        resumed = list(pack_stream(docs, _bytes, max_length=16, eos_id=EOS, start=full[cut][1], chunk=3))
        assert [r.tolist() for r, _ in resumed] == [r.tolist() for r, _ in full[cut + 1:]]
        assert [p for _, p in resumed] == [p for _, p in full[cut + 1:]]


def test_pack_stream_does_not_tokenise_documents_before_the_start() -> None:
    docs = _stream_docs(40, seed=2)
    position = list(pack_stream(docs, _bytes, max_length=16, eos_id=EOS))[10][1]
    seen: list[str] = []

    def encode(texts):
        seen.extend(texts)
        return _bytes(texts)

    next(pack_stream(docs, encode, max_length=16, eos_id=EOS, start=position, chunk=1))
    assert docs[position[0]] == seen[0]


def test_pack_stream_refuses_a_position_that_does_not_fit_the_data() -> None:
    with pytest.raises(UserError, match=r"data position \(1, 50\) does not fit this data"):
        next(pack_stream(["abc", "def"], _bytes, max_length=2, eos_id=EOS, start=(1, 50)))


def test_pack_stream_refuses_a_document_that_is_not_text() -> None:
    with pytest.raises(UserError, match="document 1 of the stream is a int, not text"):
        list(pack_stream(["abc", 5], _bytes, max_length=2, eos_id=EOS))  # type: ignore[list-item]
