"""The data, the held-out set and the batch order depend on the data: section, never on the run's length;
`data.sampling: random_windows` is wired to every kind of data that holds a token stream."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ava.config.schema.data import DataConfig
from ava.data.batches import SequenceBatches
from ava.data.setup import TrainingData, build_training_data
from ava.data.windows import RandomWindows
from ava.errors import UserError
from tests.conftest import REPO
from tests.data.corpus import documents, write_jsonl

VOCAB = 512
MICRO, EVAL = 2, 2


def _config(**data: Any) -> DataConfig:
    settings = {"max_length": 32, "max_eval_examples": 4, "shuffle_seed": 5, "dataloader_num_workers": 0,
                "builtin_tokens": 40_000, **data}
    return DataConfig.model_validate(settings)


def _build(config: DataConfig, max_steps: int, rank: int = 0, world_size: int = 1) -> TrainingData:
    """What train.py builds for a run of `max_steps` (its needed_sequences as the runner computes it)."""
    return build_training_data(config, VOCAB, micro_batch=MICRO, eval_batch=EVAL, rank=rank, world_size=world_size,
                               needed_sequences=max_steps * MICRO * world_size, max_steps=max_steps)


def _first(batches: Any, count: int) -> list[list[list[int]]]:
    out: list[list[list[int]]] = []
    for batch in batches:
        out.append(batch.tolist())
        if len(out) == count:
            break
    return out


@pytest.mark.parametrize("corpus", [{"builtin_dataset": "markov", "markov_vocab_size": 32},
                                    {"builtin_dataset": "python_stdlib"}], ids=["markov", "stdlib"])
def test_a_builtin_corpus_is_the_same_for_30_and_40_steps(corpus: dict) -> None:
    short, longer = (_build(_config(**corpus), steps) for steps in (30, 40))
    assert isinstance(short.train, SequenceBatches) and isinstance(longer.train, SequenceBatches)
    assert short.eval is not None and longer.eval is not None
    np.testing.assert_array_equal(short.train.sequences, longer.train.sequences)
    np.testing.assert_array_equal(short.eval.sequences, longer.eval.sequences)
    assert short.eval.fingerprint() == longer.eval.fingerprint()
    assert _first(short.train, 40) == _first(longer.train, 40)  # the same order, so a resume continues it
    assert short.description == longer.description
    assert len(short.train.sequences) + len(short.eval.sequences) == 40_000 // 32  # builtin_tokens, in whole rows


def test_builtin_tokens_sizes_the_corpus_and_its_held_out_share() -> None:
    small = _build(_config(builtin_dataset="markov", builtin_tokens=3200, max_eval_examples=-1), 10)
    assert small.eval is not None
    assert (len(small.train.sequences), len(small.eval.sequences)) == (95, 5)  # 100 rows, 5% held out
    large = _build(_config(builtin_dataset="markov", builtin_tokens=6400, max_eval_examples=-1), 10)
    assert large.eval is not None and len(large.eval.sequences) == 10


def test_the_held_out_fingerprint_names_the_rows_evaluated() -> None:
    base = _build(_config(builtin_dataset="markov"), 30).eval
    assert base is not None and len(base.fingerprint()) == 32
    for other in ({"max_eval_examples": 6}, {"shuffle_seed": 6}, {"builtin_dataset": "python_stdlib"}):
        changed = _build(_config(**{"builtin_dataset": "markov", **other}), 30).eval
        assert changed is not None and changed.fingerprint() != base.fingerprint(), other
    # An eval batch that no longer divides the held-out rows evaluates fewer of them: another set.
    fewer = build_training_data(_config(builtin_dataset="markov"), VOCAB, MICRO, 3, 0, 1, 60, 30).eval
    assert fewer is not None and fewer.covered == 3 and fewer.fingerprint() != base.fingerprint()


def test_random_windows_over_a_builtin_corpus_keep_the_held_out_rows() -> None:
    packed = _build(_config(builtin_dataset="markov"), 30)
    windows = _build(_config(builtin_dataset="markov", sampling="random_windows"), 30)
    assert isinstance(windows.train, RandomWindows) and windows.eval is not None and packed.eval is not None
    assert windows.eval.fingerprint() == packed.eval.fingerprint()
    assert "39,872 training tokens in random windows and 4 held-out sequences of 32 tokens" in windows.description
    assert isinstance(packed.train, SequenceBatches)
    every_window = np.lib.stride_tricks.sliding_window_view(packed.train.sequences.reshape(-1), 32)
    for row in next(iter(windows.train)).numpy():  # a contiguous stretch of the training rows joined back together
        assert (every_window == row).all(axis=1).any()
    assert _first(windows.train, 3) != _first(packed.train, 3)


def test_random_windows_over_token_files_and_their_cap(tmp_path: Path) -> None:
    (np.arange(8192) % VOCAB).astype(np.uint16).tofile(tmp_path / "train.bin")
    (np.arange(1024) % VOCAB).astype(np.uint16).tofile(tmp_path / "val.bin")
    data = _build(_config(data_dir=str(tmp_path), sampling="random_windows"), 30)
    assert isinstance(data.train, RandomWindows) and data.train.batches_per_epoch == 8192 // (32 * MICRO)
    assert "8,192 training tokens in random windows and 32 held-out sequences" in data.description
    capped = _build(_config(data_dir=str(tmp_path), sampling="random_windows", max_train_examples=10), 30)
    assert "320 training tokens in random windows" in capped.description


def test_random_windows_of_a_stream_are_refused_with_the_fix(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "a.jsonl", documents("a", 20))
    config = _config(sources=[{"path": str(tmp_path / "a.jsonl")}], streaming=True, sampling="random_windows")
    with pytest.raises(UserError, match="data.sampling: random_windows") as err:
        _build(config, 30)
    assert "data.streaming: false" in err.value.fix and "data.sampling: packed" in err.value.fix


def test_packed_is_the_default_and_unchanged() -> None:
    assert DataConfig().sampling == "packed"
    data = _build(_config(builtin_dataset="markov"), 30)
    assert isinstance(data.train, SequenceBatches)


def test_random_windows_with_retrieval_are_refused_before_training_starts(tmp_path: Path) -> None:
    from ava.config import ConfigFiles, load_config
    from ava.train import run

    resolved = load_config(ConfigFiles(str(REPO / "configs/gpu/tiny.yaml"), str(REPO / "configs/hardware/cpu.yaml")),
                           ["--sampling", "random_windows", "--model.use_rag", "true", "--model.use_cross_attention", "true",
                            "--max_steps", "2", "--warmup_steps", "1"])
    with pytest.raises(UserError, match="random_windows with model.use_rag") as err:
        run(resolved, output_dir=tmp_path / "run")
    assert "data.sampling: packed" in err.value.fix
