"""The `data.sources` keys: strict, with their defaults, and loadable from a YAML config."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from ava.config import ConfigError, ConfigFiles, WorldSize, load_config
from ava.config.schema.data import DataConfig, SourceConfig


def test_a_source_needs_only_a_path() -> None:
    source = SourceConfig.model_validate({"path": "data/*.jsonl"})
    assert (source.format, source.text_field, source.weight, source.sample_by) == (None, "text", None, "paragraph")
    assert DataConfig().sources == [] and DataConfig().tokenizer_name is None and DataConfig().cache_dir is None


@pytest.mark.parametrize("entry", [
    {"path": "a.jsonl", "wieght": 2},  # unknown key
    {"path": "a.jsonl", "weight": 0},
    {"path": "a.jsonl", "format": "xml"},
    {"path": ""},
    {"format": "json"},
    {"path": "a.jsonl", "weight": "2"},  # strict: no quoted numbers
])
def test_a_wrong_source_entry_is_refused(entry: dict) -> None:
    with pytest.raises(ValidationError):
        DataConfig.model_validate({"sources": [entry]})


def test_bpe_vocab_size_must_hold_the_byte_alphabet() -> None:
    with pytest.raises(ValidationError):
        DataConfig.model_validate({"bpe_vocab_size": 256})
    assert DataConfig.model_validate({"bpe_vocab_size": 257}).bpe_vocab_size == 257


def test_sources_load_from_a_yaml_config(write_yaml) -> None:
    path = write_yaml("run.yaml", """
        training:
          max_steps: 10
          warmup_steps: 1
        data:
          tokenizer_name: bpe
          sources:
            - path: web/*.jsonl
              weight: 3
            - {path: code.parquet, text_field: content, weight: 1.5}
        """)
    sources = load_config(ConfigFiles(path), [], world=WorldSize(1, "test")).config.data.sources
    assert [(s.path, s.text_field, s.weight) for s in sources] == [("web/*.jsonl", "text", 3.0),
                                                                  ("code.parquet", "content", 1.5)]
    bad = write_yaml("bad.yaml", """
        data:
          sources:
            - {path: a.jsonl, format: xml}
        """)
    with pytest.raises(ConfigError, match=r"data.sources\[0\].format"):
        load_config(ConfigFiles(bad), [], world=WorldSize(1, "test"))
