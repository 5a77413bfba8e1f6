"""From the `data:` section to this rank's training and evaluation batches.

Sources in this version: the two built-in corpora (no download) and a
nanoGPT/Megatron-style `train.bin`/`val.bin` pair in `data_dir`. The corpus is
tokenised only as far as the run needs, so a 100-step smoke test does not
encode the whole standard library.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ava.config.schema.data import DataConfig
from ava.data.batches import SequenceBatches
from ava.data.builtin import MarkovCorpus, python_stdlib_documents
from ava.data.packing import pack_documents
from ava.data.token_file import open_token_file
from ava.data.tokenizer import ByteTokenizer, Tokenizer, check_vocab, load_tokenizer
from ava.model.errors import ModelInputError

MARKOV_CONCENTRATION = 0.5  # Dirichlet concentration of the Markov rows: peaked enough to be learnable


@dataclass
class TrainingData:
    train: SequenceBatches
    eval: SequenceBatches | None
    description: str
    entropy_rate: float | None = None  # nats/token, known exactly for the Markov corpus


def _split(sequences: np.ndarray, data: DataConfig) -> tuple[np.ndarray, np.ndarray]:
    """Hold out the last max_eval_examples sequences (-1: 5%)."""
    n_eval = data.max_eval_examples if data.max_eval_examples >= 0 else max(1, len(sequences) // 20)
    n_eval = min(n_eval, len(sequences) // 2)
    return sequences[: len(sequences) - n_eval], sequences[len(sequences) - n_eval:]


def _stdlib_sequences(data: DataConfig, tokenizer: Tokenizer, needed_tokens: int) -> np.ndarray:
    docs: list[np.ndarray] = []
    count = 0
    for text in python_stdlib_documents():
        if isinstance(tokenizer, ByteTokenizer):  # bytes are the ids: skip the Python-int round trip
            ids = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)
        else:
            ids = np.asarray(tokenizer.encode(text), dtype=np.int64)
        docs.append(ids)
        count += ids.size + 1
        if count >= needed_tokens:
            break
    return pack_documents(docs, data.max_length, tokenizer.eos_id)


def build_training_data(data: DataConfig, model_vocab: int, micro_batch: int, eval_batch: int, rank: int,
                        world_size: int, needed_sequences: int) -> TrainingData:
    """Batches for this rank; `needed_sequences` bounds how much of a built-in corpus is prepared."""
    length = data.max_length
    eval_share = data.max_eval_examples if data.max_eval_examples >= 0 else needed_sequences // 19
    needed_tokens = (needed_sequences + eval_share + 2 * world_size * max(micro_batch, eval_batch)) * length
    entropy = None
    if data.data_dir is not None:
        directory = Path(data.data_dir)
        for name in ("train.bin", "val.bin"):
            if not (directory / name).is_file():
                raise ModelInputError(f"data.data_dir = {directory} has no {name}",
                                      "put train.bin and val.bin (uint16 token ids, nanoGPT layout) there, or set "
                                      "data_dir: null for the built-in data")
        train_tokens = open_token_file(directory / "train.bin", model_vocab)
        val_tokens = open_token_file(directory / "val.bin", model_vocab)
        train = np.asarray(train_tokens[: train_tokens.size // length * length], dtype=np.int64).reshape(-1, length)
        held_out = np.asarray(val_tokens[: val_tokens.size // length * length], dtype=np.int64).reshape(-1, length)
        description = f"token files in {directory}"
    elif data.builtin_dataset == "markov":
        corpus = MarkovCorpus(data.markov_vocab_size, seed=data.shuffle_seed, concentration=MARKOV_CONCENTRATION)
        if data.markov_vocab_size > model_vocab:
            raise ModelInputError(f"data.markov_vocab_size = {data.markov_vocab_size} exceeds model.vocab_size = "
                                  f"{model_vocab}", "lower markov_vocab_size or raise model.vocab_size")
        tokens = corpus.sample(needed_tokens, seed=data.shuffle_seed + 1)
        train, held_out = _split(tokens[: tokens.size // length * length].reshape(-1, length), data)
        entropy = corpus.entropy_rate()
        description = f"built-in Markov corpus ({data.markov_vocab_size} tokens, entropy rate {entropy:.4f} nats/token)"
    else:
        tokenizer: Tokenizer = load_tokenizer(data.tokenizer_name) if data.tokenizer_name else ByteTokenizer()
        check_vocab(tokenizer, model_vocab, "data.tokenizer_name" if data.tokenizer_name else "the byte tokenizer")
        train, held_out = _split(_stdlib_sequences(data, tokenizer, needed_tokens), data)
        description = "built-in corpus: this Python's standard-library sources"
    if data.max_train_examples >= 0:
        train = train[: data.max_train_examples]
    train_batches = SequenceBatches(train, micro_batch, rank, world_size, data.shuffle_seed, data.reshuffle_each_epoch)
    eval_batches = None
    if len(held_out) >= eval_batch * world_size:
        eval_batches = SequenceBatches(held_out, eval_batch, rank, world_size, data.shuffle_seed, False)
    return TrainingData(train_batches, eval_batches, f"{description}: {len(train)} training and {len(held_out)} "
                        f"held-out sequences of {length} tokens", entropy)
