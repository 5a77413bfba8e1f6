"""Opening and validating pre-tokenised .bin files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ava.data.token_file import open_token_file
from ava.errors import UserError


def test_valid_file_is_memory_mapped_with_its_tokens(tmp_path: Path) -> None:
    path = tmp_path / "train.bin"
    ids = np.arange(1000, dtype=np.uint32) * 70
    ids.tofile(path)
    tokens = open_token_file(path, vocab_size=70_000, dtype="uint32", chunk_tokens=64)
    assert isinstance(tokens, np.memmap)
    np.testing.assert_array_equal(tokens, ids)


def test_token_beyond_vocabulary_is_reported_with_its_position(tmp_path: Path) -> None:
    path = tmp_path / "train.bin"
    ids = np.zeros(500, dtype=np.uint16)
    ids[333], ids[400] = 300, 301
    ids.tofile(path)
    # a chunk size that puts the bad id in the middle of a later chunk checks the position arithmetic
    with pytest.raises(UserError, match=r"position 333 is 300, beyond the vocabulary \(vocab_size = 257\)") as info:
        open_token_file(path, vocab_size=257, dtype="uint16", chunk_tokens=100)
    assert str(path) in str(info.value)
    open_token_file(path, vocab_size=302, dtype="uint16")  # every id in range: accepted


def test_missing_token_file_is_reported(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        open_token_file(tmp_path / "absent.bin", vocab_size=10)


def test_empty_token_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "empty.bin"
    path.write_bytes(b"")
    with pytest.raises(UserError, match="is empty"):
        open_token_file(path, vocab_size=10)


def test_truncated_token_file_is_reported_with_its_size(tmp_path: Path) -> None:
    path = tmp_path / "odd.bin"
    path.write_bytes(b"\x01\x00\x02\x00\x03\x00")  # 6 bytes: fine for uint16, not for uint32
    assert open_token_file(path, vocab_size=10, dtype="uint16").tolist() == [1, 2, 3]
    with pytest.raises(UserError, match="6 bytes, not a multiple of 4"):
        open_token_file(path, vocab_size=10, dtype="uint32")
