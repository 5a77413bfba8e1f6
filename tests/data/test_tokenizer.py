"""The byte tokenizer, tokenizer.json loading, and the vocabulary check."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ava.data.tokenizer import ByteTokenizer, Tokenizer, check_vocab, encode_many, load_tokenizer
from ava.errors import UserError


def test_byte_tokenizer_round_trips_unicode_text() -> None:
    tok = ByteTokenizer()
    text = "héllo, 世界 🙂\n"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert (tok.vocab_size, tok.eos_id) == (257, 256)


def test_byte_tokenizer_decodes_broken_utf8_and_eos_without_raising() -> None:
    tok = ByteTokenizer()
    ids = tok.encode("é")[:1] + [tok.eos_id] + tok.encode("ok")
    assert tok.decode(ids) == "\ufffdok"


def test_byte_tokenizer_satisfies_the_protocol() -> None:
    assert isinstance(ByteTokenizer(), Tokenizer)


def _write_tokenizer_json(path: Path, eos: str | None = "<|endoftext|>") -> None:
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    vocab = {"[UNK]": 0, "hello": 1, "world": 2}
    hf = HFTokenizer(WordLevel(vocab, unk_token="[UNK]"))
    hf.pre_tokenizer = Whitespace()
    if eos is not None:
        hf.add_special_tokens([eos])
    hf.save(str(path))


def test_tokenizer_json_is_loaded_with_its_eos_id(tmp_path: Path) -> None:
    _write_tokenizer_json(tmp_path / "tokenizer.json")
    tok = load_tokenizer(tmp_path)  # a directory holding tokenizer.json is accepted
    assert isinstance(tok, Tokenizer)
    assert tok.encode("hello world") == [1, 2]
    assert tok.decode([1, 2]) == "hello world"
    assert (tok.vocab_size, tok.eos_id) == (4, 3)


def test_missing_tokenizer_file_is_reported_with_its_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "tokenizer.json"
    with pytest.raises(UserError, match="does not exist") as info:
        load_tokenizer(missing)
    assert str(missing) in str(info.value) and "Fix:" in str(info.value)


def test_corrupt_tokenizer_file_is_reported_with_its_path(tmp_path: Path) -> None:
    path = tmp_path / "tokenizer.json"
    path.write_text('{"model": ')
    with pytest.raises(UserError, match="could not be read") as info:
        load_tokenizer(path)
    assert str(path) in str(info.value)


def test_tokenizer_without_an_eos_token_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "tokenizer.json"
    _write_tokenizer_json(path, eos=None)
    with pytest.raises(UserError, match="end-of-document"):
        load_tokenizer(path)


def test_tokenizer_larger_than_model_vocab_is_refused_naming_both_sizes() -> None:
    with pytest.raises(UserError, match="257 exceeds model.vocab_size = 256") as info:
        check_vocab(ByteTokenizer(), 256, "data.tokenizer_name")
    assert "data.tokenizer_name" in str(info.value)
    check_vocab(ByteTokenizer(), 257, "data.tokenizer_name")  # an exact fit is fine


def test_encode_many_gives_what_encode_gives_for_every_tokenizer(tmp_path: Path) -> None:
    _write_tokenizer_json(tmp_path / "tokenizer.json")
    texts = ["hello world", "", "world hello hello", "héllo 世界"]
    for tok in (ByteTokenizer(), load_tokenizer(tmp_path)):
        encoded = encode_many(tok, texts)
        assert [ids.tolist() for ids in encoded] == [tok.encode(t) for t in texts]
        assert all(ids.dtype == np.int64 for ids in encoded)
