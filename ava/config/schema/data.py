"""The `data:` section: sources, tokenizer, processing and DataLoader settings."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ava.config.schema.base import (
    BATCH_MAX,
    COUNT_MAX,
    ITEMS_MAX,
    SEED_MAX,
    TOKENS_MAX,
    VOCAB_MAX,
    WEIGHT_MAX,
    WORKERS_MAX,
    Section,
)

SourceFormat = Literal["text", "json", "jsonl", "parquet", "csv"]

# The BPE trainer holds the text it reads in memory: 2^40 bytes (1 TiB) is more than any host has.
BPE_BYTES_MAX = 2**40
# The Markov corpus is built from a vocab x vocab transition matrix (float64) and its stationary distribution (a
# linear solve): 4,096 tokens is a 128 MiB matrix and a solve of seconds; 2^16 would be 32 GiB.
MARKOV_VOCAB_MAX = 4096
# The built-in corpus is held in memory as int64 tokens: 2^32 tokens is 32 GiB (the stdlib holds about 11M).
BUILTIN_TOKENS_MAX = 2**32
# p_i ~ weight_i^(1/T): at T = 1e6 the largest ratio of two float weights (about e^1418) is within 0.2% of 1, so
# the mix is already uniform.
MIXING_TEMPERATURE_MAX = 1e6


class SourceConfig(Section):
    """One entry of `data.sources`: local files read through Hugging Face `datasets`."""

    path: str = Field(min_length=1, description="A file, a glob (data/*.jsonl) or a directory (read recursively).")
    format: SourceFormat | None = Field(
        None, description="text, json/jsonl, parquet or csv; null infers it from the file extensions.")
    text_field: str = Field("text", min_length=1, description="Column (json key) holding each document's text.")
    weight: float | None = Field(
        None, gt=0, le=WEIGHT_MAX,
        description="Mixing weight (with use_weighted_mixing); null weighs the source by its size. "
        "Give every source a weight or none.")
    sample_by: Literal["line", "paragraph", "document"] = Field(
        "paragraph", description="text format only: what one document is (a line, a blank-line paragraph, a file).")


class DataConfig(Section):
    """Where the data comes from and how it is loaded."""

    data_dir: str | None = Field(
        None, description="Directory with pre-tokenised train.bin/val.bin; takes precedence over sources.")
    eos_token_id: int | None = Field(
        None, ge=0, le=VOCAB_MAX - 1, description="The end-of-document id inside data_dir's token files (GPT-2's: 50256), where "
        "retrieval's own-document exclusion and the episodic memory find document boundaries; null = none "
        "known (each row then counts as one document). Text data takes it from its tokenizer.")
    sources: list[SourceConfig] = Field(
        default_factory=list,
        description="Local text/json/jsonl/parquet/csv files to train on (list of {path, format, text_field, "
        "weight, sample_by}); empty uses the built-in dataset.")
    tokenizer_name: str | None = Field(
        None, description="Local tokenizer.json path; 'bpe' trains a byte-level BPE on the corpus (cached); "
        "null uses the training.init_from model's tokenizer.json if it has one, else the built-in byte "
        "tokenizer. With data_dir: the tokenizer that made the token files, saved with the model.")
    bpe_vocab_size: int | None = Field(
        None, ge=257, le=VOCAB_MAX,
        description="Vocabulary of the trained BPE (tokenizer_name: bpe); null uses model.vocab_size.")
    bpe_training_bytes: int = Field(
        100_000_000, gt=0, le=BPE_BYTES_MAX, description="At most this much text (UTF-8 bytes) is read to train the BPE.")
    cache_dir: str | None = Field(
        None, description="Where trained tokenizers and the datasets Arrow cache go; null uses $AVA_CACHE_DIR, "
        "else ~/.cache/ava. Nothing is ever written next to the data.")
    builtin_dataset: Literal["python_stdlib", "markov"] = Field(
        "python_stdlib", description="Which built-in corpus is used when data_dir and sources are unset.")
    markov_vocab_size: int = Field(64, gt=1, le=MARKOV_VOCAB_MAX, description="Tokens of the built-in Markov corpus.")
    builtin_tokens: int = Field(
        1_000_000, gt=0, le=BUILTIN_TOKENS_MAX,
        description="Size of the built-in corpus in tokens, held-out sequences included (the "
        "first tokens of the stdlib, or a Markov sample this long). Fixed, so the data and the held-out set "
        "do not change with training.max_steps; the stdlib holds about 11M byte tokens.")

    max_length: int = Field(1024, gt=0, le=TOKENS_MAX, description="Tokens per training sequence.")
    sampling: Literal["packed", "random_windows"] = Field(
        "packed", description="packed: each epoch visits the packed rows in a seeded order; random_windows: "
        "each batch takes windows of max_length tokens at random offsets of the training token stream "
        "(nanoGPT/Megatron style; token files and in-memory data, not streams).")
    max_train_examples: int = Field(-1, ge=-1, le=COUNT_MAX, description="Cap on training examples; -1 means all.")
    max_eval_examples: int = Field(1000, ge=-1, le=COUNT_MAX, description="Cap on evaluation examples; -1 means all.")
    padding_side: Literal["left", "right"] = Field(
        "right", description="Accepted for compatibility; no effect (Ava pads on the right, where padding is exact; "
        "see ava.config.schema.compatibility). 'left' warns.")
    truncation: bool = Field(
        True, description="RLHF SFT, reward and DPO examples longer than max_length: true cuts the response's end "
        "(the prompt stays whole; an example whose prompt fills max_length is still left out), false leaves them "
        "out. Pre-training packs documents across rows, so nothing is cut there.")

    train_batch_size: int | None = Field(
        None, gt=0, le=BATCH_MAX, description="Same value as training.batch_size (per-device micro batch).")
    eval_batch_size: int = Field(16, gt=0, le=BATCH_MAX, description="Per-device batch size for evaluation.")

    # Batches do not come from a torch DataLoader (exact resume needs one producer); ava.data.setup
    # says what each of these settings does.
    dataloader_num_workers: int = Field(
        8, ge=0, le=WORKERS_MAX, description="Streaming: > 0 prepares batches in one background thread; in-memory data: unused.")
    dataloader_drop_last: bool = Field(
        True, description="Drop the last incomplete training batch (in-memory data; streamed batches are full).")
    dataloader_pin_memory: bool = Field(True, description="Pin host memory for faster device copies (CUDA only).")
    dataloader_prefetch_factor: int | None = Field(
        2, gt=0, le=WORKERS_MAX, description="Streaming: the thread prepares prefetch_factor x num_workers batches ahead.")
    dataloader_persistent_workers: bool = Field(
        True, description="Accepted for compatibility; no effect: the one producer thread needs no keeping alive "
        "(see ava.data.setup, ava.config.schema.compatibility). false warns.")

    use_weighted_mixing: bool = Field(
        True, description="Sample several sources with probabilities from their weights; false concatenates them.")
    mixing_temperature: float = Field(
        1.0, gt=0, le=MIXING_TEMPERATURE_MAX,
        description="p_i proportional to weight_i^(1/T): 1 keeps the weights, larger flattens to uniform.")
    bad_records: Literal["fail", "skip"] = Field(
        "fail", description="A corrupt line in a JSON Lines source (not JSON, not an object, no text field): "
        "fail lists the line numbers at start-up; skip trains on the rest and reports how many were skipped.")
    streaming: bool = Field(
        True, description="Stream data.sources instead of loading them into memory (needs training.max_steps).")
    buffer_size: int = Field(15000, gt=0, le=ITEMS_MAX, description="Shuffle buffer size when streaming.")
    max_samples: int = Field(
        -1, ge=-1, le=COUNT_MAX, description="Cap on documents read from data.sources (per epoch when streaming); -1 means all.")
    shuffle_seed: int = Field(42, ge=0, le=SEED_MAX, description="Seed of the data order.")
    reshuffle_each_epoch: bool = Field(True, description="Use a new order every epoch.")
