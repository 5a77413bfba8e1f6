"""build_training_data: which data wins, the checks on the settings, and streamed data end to end."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ava.config.schema.data import DataConfig
from ava.data.batches import SequenceBatches
from ava.data.setup import TrainingData, build_training_data
from ava.data.streaming import StreamingBatches
from ava.data.tokenizer import ByteTokenizer, FileTokenizer
from ava.errors import UserError
from tests.data.corpus import documents, write_csv, write_jsonl, write_text

VOCAB = 512


def _config(**data: Any) -> DataConfig:
    settings = {"max_length": 32, "max_eval_examples": 4, "shuffle_seed": 5, "dataloader_num_workers": 0, **data}
    return DataConfig.model_validate(settings)


def _build(config: DataConfig, rank: int = 0, world_size: int = 1, max_steps: int | None = 10,
           needed_sequences: int = 64) -> TrainingData:
    return build_training_data(config, VOCAB, micro_batch=2, eval_batch=2, rank=rank, world_size=world_size,
                               needed_sequences=needed_sequences, max_steps=max_steps)


def _tags(batch_rows: Any) -> set[str]:
    """Document markers such as 'a17' in byte-tokenised rows (row boundaries can cut one, hence the full words)."""
    text = ByteTokenizer().decode(np.asarray(batch_rows).reshape(-1).tolist())
    return set(re.findall(r"(?<![a-z0-9])([a-z]\d+)(?= )", text))


def _take(batches: Any, count: int) -> list[list[list[int]]]:
    out: list[list[list[int]]] = []
    while len(out) < count:
        for batch in batches:
            out.append(batch.tolist())
            if len(out) == count:
                break
    return out


@pytest.fixture
def two_sources(tmp_path: Path) -> list[dict[str, Any]]:
    write_jsonl(tmp_path / "a.jsonl", documents("a", 120))
    write_csv(tmp_path / "b.csv", documents("b", 60))
    return [{"path": str(tmp_path / "a.jsonl")}, {"path": str(tmp_path / "b.csv")}]


def test_token_files_win_over_sources_and_sources_over_the_builtin_corpus(tmp_path: Path,
                                                                          two_sources: list[dict]) -> None:
    np.arange(4096, dtype=np.uint16).__mod__(VOCAB).astype(np.uint16).tofile(tmp_path / "train.bin")
    np.arange(1024, dtype=np.uint16).__mod__(VOCAB).astype(np.uint16).tofile(tmp_path / "val.bin")
    both = _build(_config(data_dir=str(tmp_path), sources=two_sources, streaming=False))
    assert both.description.startswith(f"token files in {tmp_path}")
    sources = _build(_config(sources=two_sources, streaming=False))
    assert sources.description.startswith("data.sources, mixed by documents^(1/T), T = 1.0")
    assert "a.jsonl (json, 120 documents, p = 0.667)" in sources.description
    assert isinstance(sources.tokenizer, ByteTokenizer)
    builtin = _build(_config(builtin_dataset="markov"))
    assert builtin.description.startswith("built-in Markov corpus")


def test_in_memory_sources_are_mixed_shuffled_and_held_out(two_sources: list[dict]) -> None:
    data = _build(_config(sources=two_sources, streaming=False))
    assert isinstance(data.train, SequenceBatches) and data.eval is not None
    read = re.search(r"(\d+) documents in memory", data.description)
    assert read is not None and int(read.group(1)) >= 180  # each source read to its end (a few drawn twice)
    assert "4 held-out sequences" in data.description
    train_tags = _tags(np.concatenate([b.numpy() for b in data.train]))
    assert {t[0] for t in train_tags} == {"a", "b"}
    held_out_tags = _tags(np.concatenate([b.numpy() for b in data.eval]))
    assert held_out_tags and {t[0] for t in held_out_tags} <= {"a", "b"}


def test_max_samples_caps_the_documents_read(two_sources: list[dict]) -> None:
    data = _build(_config(sources=two_sources, streaming=False, max_samples=50))
    assert "50 documents in memory" in data.description


def test_concatenation_when_mixing_is_off(two_sources: list[dict]) -> None:
    data = _build(_config(sources=two_sources, streaming=False, use_weighted_mixing=False))
    assert data.description.startswith("data.sources, concatenated")
    assert "180 documents in memory" in data.description


@pytest.mark.parametrize("settings, message", [
    ({"streaming": True}, r"data.sources\[0\].weight, data.sources\[1\].weight not set: with data.streaming"),
    ({"streaming": False, "use_weighted_mixing": False, "weights": [1.0, None]},
     r"data.sources\[0\].weight is set but data.use_weighted_mixing is false"),
    ({"streaming": False, "weights": [1.0, None]}, r"data.sources\[0\].weight set but data.sources\[1\] has none"),
    ({"streaming": True, "max_train_examples": 10, "weights": [1.0, 1.0]}, "data.max_train_examples = 10 cannot cap"),
    ({"streaming": True, "max_eval_examples": -1, "weights": [1.0, 1.0]}, r"data.max_eval_examples = -1 \(all\)"),
    ({"streaming": False, "tokenizer_name": "bpe", "bpe_vocab_size": 1000}, "data.bpe_vocab_size = 1000 exceeds"),
])
def test_settings_that_cannot_work_are_refused_with_the_key(two_sources: list[dict], settings: dict,
                                                           message: str) -> None:
    weights = settings.pop("weights", [None, None])
    sources = [{**s, "weight": w} for s, w in zip(two_sources, weights, strict=True)]
    with pytest.raises(UserError, match=message) as err:
        _build(_config(sources=sources, **settings))
    assert err.value.fix


def test_a_stream_needs_max_steps(two_sources: list[dict]) -> None:
    with pytest.raises(UserError, match="needs training.max_steps") as err:
        _build(_config(sources=two_sources[:1], streaming=True), max_steps=None)
    assert "data.streaming: false" in err.value.fix


def _streamed(two_sources: list[dict], **settings: Any) -> DataConfig:
    sources = [{**two_sources[0], "weight": 2.0}, {**two_sources[1], "weight": 1.0}]
    return _config(sources=sources, streaming=True, buffer_size=16, **settings)


def test_streamed_held_out_documents_are_never_trained_on(two_sources: list[dict]) -> None:
    data = _build(_streamed(two_sources, max_eval_examples=6))
    assert isinstance(data.train, StreamingBatches) and data.eval is not None
    held = re.search(r"the first documents of each source: (\d+) from data.sources\[0\], (\d+) from", data.description)
    assert held is not None
    held_a, held_b = int(held.group(1)), int(held.group(2))
    assert held_a > 0 and held_b > 0
    held_out = {f"a{i}" for i in range(held_a)} | {f"b{i}" for i in range(held_b)}
    first_epoch = _tags(np.concatenate([b.numpy() for b in data.train]))
    assert not first_epoch & held_out
    assert {f"a{i}" for i in range(held_a + 1, 119)} <= first_epoch  # every other document is trained on
    assert _tags(np.concatenate([b.numpy() for b in data.eval])) <= held_out


def test_streamed_ranks_train_on_disjoint_documents(two_sources: list[dict]) -> None:
    # Concatenated: a weighted mix reads a source that runs out early again, and a repeat may go to either rank.
    config = _config(sources=two_sources, streaming=True, buffer_size=16, use_weighted_mixing=False,
                     max_eval_examples=0)
    seen = [_tags(np.concatenate([b.numpy() for b in _build(config, rank=r, world_size=2).train])) for r in (0, 1)]
    assert seen[0] and seen[1]
    # a document cut at a row boundary can show its marker in two rows, but not on both ranks
    assert len(seen[0] & seen[1]) == 0


def test_held_out_documents_stay_out_when_ranks_split_the_stream_by_files(tmp_path: Path) -> None:
    # Two files per source and two ranks: `datasets` gives each rank whole files, and would divide a
    # skip of the first documents between the files; the held-out documents must still never be trained on.
    a, b = documents("a", 120), documents("b", 80)
    for i in range(2):
        write_jsonl(tmp_path / "a" / f"{i}.jsonl", a[i * 60:(i + 1) * 60])
        write_jsonl(tmp_path / "b" / f"{i}.jsonl", b[i * 40:(i + 1) * 40])
    config = _config(sources=[{"path": str(tmp_path / "a")}, {"path": str(tmp_path / "b")}], streaming=True,
                     use_weighted_mixing=False, buffer_size=8, max_eval_examples=6)
    data = [_build(config, rank=r, world_size=2) for r in (0, 1)]
    held = re.search(r"each source: (\d+) from data.sources\[0\], (\d+) from", data[0].description)
    assert held is not None
    held_out = {f"a{i}" for i in range(int(held.group(1)))} | {f"b{i}" for i in range(int(held.group(2)))}
    trained = [_tags(np.concatenate([b.numpy() for b in d.train])) for d in data]
    assert not (trained[0] | trained[1]) & held_out
    assert not trained[0] & trained[1]
    everything = {f"a{i}" for i in range(120)} | {f"b{i}" for i in range(80)}
    assert len(everything - held_out - trained[0] - trained[1]) <= 4  # only what epoch ends drop is missing


@pytest.mark.parametrize("workers, rank, world_size", [(0, 0, 1), (2, 0, 1), (1, 1, 2)])
def test_a_streamed_run_resumes_with_exactly_the_batches_it_would_have_seen(two_sources: list[dict], workers: int,
                                                                           rank: int, world_size: int) -> None:
    config = _streamed(two_sources, dataloader_num_workers=workers, max_samples=40)  # short epochs

    def build() -> Any:
        return _build(config, rank=rank, world_size=world_size).train

    total = 70 // world_size
    whole = build()
    uninterrupted = _take(whole, total)
    assert whole.state_dict()["epoch"] >= 2  # the resume point and the end lie in different epochs
    first = build()
    before = _take(first, 31 // world_size)
    resumed = build()
    resumed.load_state_dict(first.state_dict())
    assert before + _take(resumed, total - len(before)) == uninterrupted


def test_a_bpe_is_trained_on_the_sources_and_cached_where_configured(tmp_path: Path, two_sources: list[dict]) -> None:
    config = _config(sources=two_sources, streaming=False, tokenizer_name="bpe", bpe_vocab_size=300,
                     cache_dir=str(tmp_path / "cache"))
    data = _build(config)
    assert isinstance(data.tokenizer, FileTokenizer)
    assert data.tokenizer.path.parent.parent == tmp_path / "cache" / "tokenizers"
    assert data.tokenizer.vocab_size <= 300 and "byte-level BPE tokenizer" in data.description
    rows = np.concatenate([b.numpy() for b in data.train])
    assert rows.max() < data.tokenizer.vocab_size
    assert "a7 a7" in data.tokenizer.decode(rows.reshape(-1).tolist()) or \
        "b7 b7" in data.tokenizer.decode(rows.reshape(-1).tolist())


def test_without_cache_dir_the_cache_is_under_ava_cache_dir(tmp_path: Path, two_sources: list[dict],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AVA_CACHE_DIR", str(tmp_path / "env-cache"))
    data = _build(_config(sources=two_sources[:1], streaming=False, tokenizer_name="bpe", bpe_vocab_size=300))
    assert isinstance(data.tokenizer, FileTokenizer)
    assert data.tokenizer.path.is_relative_to(tmp_path / "env-cache" / "tokenizers")
    assert (tmp_path / "env-cache" / "datasets").is_dir()


def test_the_builtin_corpus_can_train_a_bpe_too() -> None:
    data = _build(_config(tokenizer_name="bpe", bpe_vocab_size=300, bpe_training_bytes=100_000))
    assert isinstance(data.tokenizer, FileTokenizer)
    assert data.description.startswith("built-in corpus: this Python's standard-library sources, byte-level BPE")


def test_drop_last_false_keeps_the_last_partial_batch() -> None:
    # 61 training sequences: not a whole number of micro-batches, whatever the micro-batch size
    dropped = _build(_config(builtin_dataset="markov", markov_vocab_size=16, max_train_examples=61),
                     needed_sequences=61)
    kept = _build(_config(builtin_dataset="markov", markov_vocab_size=16, dataloader_drop_last=False,
                          max_train_examples=61), needed_sequences=61)
    assert "61 training" in kept.description
    assert kept.train.batches_per_epoch == dropped.train.batches_per_epoch + 1


def test_text_sources_split_paragraphs_into_documents(tmp_path: Path) -> None:
    write_text(tmp_path / "book.txt", documents("t", 30))
    data = _build(_config(sources=[{"path": str(tmp_path / "book.txt")}], streaming=False))
    assert "30 documents in memory" in data.description
