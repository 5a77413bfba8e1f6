"""The `data:` section: sources, tokenizer, processing and DataLoader settings."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ava.config.schema.base import Section


class DataConfig(Section):
    """Where the data comes from and how it is loaded."""

    data_dir: str | None = Field(None, description="Processed data directory; null uses the built-in dataset.")
    tokenizer_name: str | None = Field(None, description="Local tokenizer path; null uses the built-in tokenizer.")
    builtin_dataset: Literal["python_stdlib", "markov"] = Field(
        "python_stdlib", description="Which built-in corpus is used when data_dir is null.")
    markov_vocab_size: int = Field(64, gt=1, description="Tokens of the built-in Markov corpus.")

    max_length: int = Field(1024, gt=0, description="Tokens per training sequence.")
    max_train_examples: int = Field(-1, ge=-1, description="Cap on training examples; -1 means all.")
    max_eval_examples: int = Field(1000, ge=-1, description="Cap on evaluation examples; -1 means all.")
    padding_side: Literal["left", "right"] = Field("right", description="Side padding goes on.")
    truncation: bool = Field(True, description="Truncate documents longer than max_length.")

    train_batch_size: int | None = Field(
        None, gt=0, description="Same value as training.batch_size (per-device micro batch).")
    eval_batch_size: int = Field(16, gt=0, description="Per-device batch size for evaluation.")

    dataloader_num_workers: int = Field(8, ge=0, description="DataLoader worker processes.")
    dataloader_drop_last: bool = Field(True, description="Drop the last incomplete batch.")
    dataloader_pin_memory: bool = Field(True, description="Pin host memory for faster device copies.")
    dataloader_prefetch_factor: int | None = Field(2, gt=0, description="Batches prefetched per worker.")
    dataloader_persistent_workers: bool = Field(True, description="Keep workers alive across epochs.")

    use_weighted_mixing: bool = Field(True, description="Mix several sources by size-based weights.")
    mixing_temperature: float = Field(1.0, gt=0, description="Temperature of the mixing weights (1 = by size).")
    streaming: bool = Field(True, description="Stream data instead of loading it all into memory.")
    buffer_size: int = Field(15000, gt=0, description="Shuffle buffer size when streaming.")
    max_samples: int = Field(-1, ge=-1, description="Cap on samples read from the stream; -1 means all.")
    shuffle_seed: int = Field(42, ge=0, description="Seed of the data order.")
    reshuffle_each_epoch: bool = Field(True, description="Use a new order every epoch.")
