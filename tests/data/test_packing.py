"""Packing documents into full rows separated by the end-of-document id."""

from __future__ import annotations

import numpy as np

from ava.data.packing import pack_documents

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
