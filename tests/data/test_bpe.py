"""The byte-level BPE trained on the corpus: what it encodes, and that it is trained once per corpus."""

from __future__ import annotations

from pathlib import Path

import pytest

from ava.data import bpe
from ava.data.bpe import EOS_TOKEN, cached_bpe, round_robin_sample
from ava.data.tokenizer import FileTokenizer, Tokenizer

CORPUS = [f"def function_{i}(value):\n    return value * {i} + offset_{i % 7}\n" for i in range(300)]
FINGERPRINT = {"files": [["/data/a.jsonl", 1234, 5678]]}


def _train(cache: Path, vocab: int = 400, corpus: object = FINGERPRINT) -> FileTokenizer:
    return cached_bpe(cache, corpus, vocab, max_bytes=1_000_000, documents=lambda: iter(CORPUS))


def test_trained_bpe_round_trips_any_text_and_fits_the_vocabulary(tmp_path: Path) -> None:
    tokenizer = _train(tmp_path)
    assert isinstance(tokenizer, Tokenizer)
    assert 257 <= tokenizer.vocab_size <= 400
    assert tokenizer.decode(tokenizer.encode(EOS_TOKEN)) == EOS_TOKEN
    assert tokenizer.eos_id == tokenizer._tokenizer.token_to_id(EOS_TOKEN)
    for text in (CORPUS[3], "ünïcödé ✓ and text the corpus never saw 😀"):
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids) == text
        assert all(0 <= i < tokenizer.vocab_size for i in ids)
    # merges learnt from the corpus: its lines take far fewer tokens than bytes
    assert len(tokenizer.encode(CORPUS[10])) < len(CORPUS[10].encode()) / 2


def test_a_second_call_loads_the_cached_tokenizer_without_training(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    first = _train(tmp_path)
    stamp = first.path.stat().st_mtime_ns

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("trained again although the cache holds this tokenizer")

    monkeypatch.setattr(bpe, "train_bpe", refuse)
    second = _train(tmp_path)
    assert second.path == first.path and second.path.stat().st_mtime_ns == stamp
    assert second.encode(CORPUS[0]) == first.encode(CORPUS[0])


def test_another_vocabulary_or_corpus_trains_a_new_entry(tmp_path: Path) -> None:
    base = _train(tmp_path).path
    assert _train(tmp_path, vocab=300).path != base
    assert _train(tmp_path, corpus={"files": [["/data/a.jsonl", 1235, 5678]]}).path != base
    assert len(list(tmp_path.glob("bpe-*/tokenizer.json"))) == 3


def test_training_is_deterministic(tmp_path: Path) -> None:
    one = _train(tmp_path / "one").path.read_text()
    two = _train(tmp_path / "two").path.read_text()
    assert one == two


def test_the_sample_takes_from_every_source_in_turn_within_the_budget() -> None:
    a = [f"a{i}" * 5 for i in range(100)]  # 10 bytes each
    b = [f"b{i}" * 5 for i in range(100)]
    sample = list(round_robin_sample([a, [None, "", *b]], max_bytes=100))
    assert sample[:5] == [a[0], a[1], a[2], b[0], a[3]]  # None and "" skipped (each used its turn)
    assert sum(len(t) for t in sample) == 100
    assert list(round_robin_sample([["x"], ["y", "z"]], max_bytes=1000)) == ["x", "y", "z"]
