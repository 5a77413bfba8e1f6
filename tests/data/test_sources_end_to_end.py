"""From files on disk to training batches: jsonl + parquet + csv, weighted mixing, and a BPE trained on them."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from ava.config.schema.data import DataConfig
from ava.data.setup import build_training_data
from ava.data.tokenizer import FileTokenizer
from tests.data.corpus import documents, write_csv, write_jsonl, write_parquet

MODEL_VOCAB = 1024


@pytest.mark.parametrize("streaming", [False, True])
def test_three_formats_mixed_and_bpe_tokenised_reach_the_batches(tmp_path: Path, streaming: bool) -> None:
    write_jsonl(tmp_path / "web" / "part-0.jsonl", documents("web", 150, words=20))
    write_jsonl(tmp_path / "web" / "part-1.jsonl", documents("net", 150, words=20))
    write_parquet(tmp_path / "code.parquet", documents("code", 100, words=20), field="content")
    write_csv(tmp_path / "notes.csv", documents("note", 80, words=20))
    config = DataConfig.model_validate({
        "sources": [
            {"path": str(tmp_path / "web"), "weight": 3.0},
            {"path": str(tmp_path / "code.parquet"), "text_field": "content", "weight": 2.0},
            {"path": str(tmp_path / "*.csv"), "format": "csv", "weight": 1.0},
        ],
        "use_weighted_mixing": True, "mixing_temperature": 2.0, "streaming": streaming, "buffer_size": 64,
        "tokenizer_name": "bpe", "bpe_vocab_size": 600, "max_length": 64, "max_eval_examples": 6,
        "cache_dir": str(tmp_path / "cache"), "dataloader_num_workers": 1,
    })
    data = build_training_data(config, MODEL_VOCAB, micro_batch=4, eval_batch=2, rank=0, world_size=1,
                               needed_sequences=400, max_steps=100)

    assert isinstance(data.tokenizer, FileTokenizer) and data.tokenizer.vocab_size <= 600
    assert "T = 2.0" in data.description and "byte-level BPE" in data.description
    assert data.eval is not None and all(b.shape == (2, 64) for b in data.eval)
    batches = []
    for batch in data.train:  # one epoch
        assert batch.dtype == torch.long and batch.shape == (4, 64)
        batches.append(batch.numpy())
    rows = np.concatenate(batches)
    assert rows.min() >= 0 and rows.max() < data.tokenizer.vocab_size <= MODEL_VOCAB
    text = data.tokenizer.decode(rows.reshape(-1).tolist())
    counts = {tag: len(re.findall(rf"\b{tag}\d+\b", text)) for tag in ("web", "net", "code", "note")}
    assert all(counts.values()), counts  # every file reached the batches
    assert "<|endoftext|>" in text  # documents separated by the BPE's end-of-text token
    words = set(re.findall(r"[a-z]+(?=\d)", text))
    assert words <= {"web", "net", "code", "note"}  # and nothing else did
