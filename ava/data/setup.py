"""From the `data:` section to this rank's training and evaluation batches.

Used by train.py and by retrieval (`ava.rag`, which builds its store from the
training rows), so it sits in the data package, below both.

Where the data comes from (the first that is set wins):

1. `data_dir`: a nanoGPT/Megatron-style `train.bin`/`val.bin` pair of token ids.
2. `sources`: local text, json/jsonl, parquet or csv files read with Hugging Face
   `datasets`, mixed by weight (`use_weighted_mixing`, `mixing_temperature`) or
   concatenated, then either loaded into memory or, with `streaming: true`,
   read as a stream (which needs `training.max_steps`).
3. `builtin_dataset`: this Python's stdlib sources or a Markov chain; no download.
   Its size is `builtin_tokens` (1M by default): the first tokens of the stdlib
   in sorted path order, or a Markov sample that long. Only those files are read
   and tokenised, so a smoke test does not encode the whole standard library
   (with the byte tokenizer, about 0.05 s on 2 cores).

The data stays put: what is trained on, what is held out and the order of the
batches are functions of the `data:` section (and the batch shape), never of
`training.max_steps`, so a run resumed with another `max_steps` continues the
same data where it stopped and evaluates on the same held-out set. (A stream's
nominal epoch, `needed_sequences`, is the one exception, and it only says when
`eval_strategy: epoch` falls; the stream itself does not change.)

Sampling (`sampling`): `packed` (default) visits the packed rows of
`max_length` tokens in an order fixed by `shuffle_seed` (`ava.data.batches`);
`random_windows` cuts windows of `max_length` tokens at seeded random offsets
of the training token stream, nanoGPT/Megatron style (`ava.data.windows`):
`train.bin` as it is, in-memory data as its packed training rows joined back
into one stream (`max_train_examples` then caps it at that many rows' worth of
tokens). Streams have no stream to cut windows from, and refuse it. Either
way the held-out set is the same fixed rows.

`streaming` applies to `sources` only.  A source's size, for mixing, is its
number of documents; a stream's is unknown without reading all of it (bytes
on disk would mislead: parquet and .gz are compressed), so several streamed
sources are mixed by explicit weights, or concatenated.

Held-out data: `val.bin` for token files; for in-memory data the documents are
shuffled (seeded) and packed, and the last `max_eval_examples` sequences held
out (-1: 5%); for streams the first documents of each source, which training
then leaves out wherever they appear (`ava.data.holdout`).

Tokenizer (sources and the stdlib corpus): `tokenizer_name` null is the byte
tokenizer, a path loads a `tokenizer.json`, and `bpe` trains a byte-level BPE
on the corpus once and caches it (`ava.data.bpe`).

Cache: `data.cache_dir`, else `$AVA_CACHE_DIR`, else `~/.cache/ava`; it holds
`tokenizers/` (trained BPEs), `datasets/` (the Arrow copy `datasets` makes of
an in-memory source), and what start-up screening keeps (`ava.data.record_check`):
`record_checks/` (verdicts), `clean_jsonl/` (JSON Lines with corrupt lines
skipped) and `utf8/` (UTF-8 copies of UTF-16/32 files).  Nothing is ever
written into the data's own directory.

DataLoader settings.  Batches are not produced by a torch DataLoader: with
several worker processes which worker's batch comes next, and so where each
must restart on resume, depends on the pool, and exact resume matters more.
What each setting does:
- `dataloader_drop_last`: honoured for in-memory training batches (false
  completes the last batch by wrapping round); a stream's batches are always full.
- `dataloader_pin_memory`: honoured, when CUDA is available.
- `dataloader_num_workers`, `dataloader_prefetch_factor`: for a stream,
  num_workers > 0 prepares batches in one background thread, prefetch_factor x
  num_workers of them ahead, in the same order and with the same resume
  positions as without it.  In-memory batches are slices of an array with
  nothing to prepare, so they are not used there.
- `dataloader_persistent_workers`: not used; the one producer thread lives for
  an epoch's iteration and costs nothing to start.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import sysconfig
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ava.config.schema.data import DataConfig
from ava.data.batches import SequenceBatches
from ava.data.bpe import cached_bpe, round_robin_sample
from ava.data.builtin import MarkovCorpus, python_stdlib_documents, stdlib_documents
from ava.data.holdout import hold_out_heads
from ava.data.mixing import chosen_weights, mix, mixing_probabilities
from ava.data.model_tokens import BPE  # the tokenizer_name that means "train a BPE on this corpus"
from ava.data.packing import pack_documents
from ava.data.record_check import screened
from ava.data.sources import Source, load_source, resolve_source
from ava.data.streaming import StreamingBatches, rank_documents
from ava.data.token_file import open_token_file
from ava.data.tokenizer import ByteTokenizer, Tokenizer, check_vocab, encode_many, load_tokenizer
from ava.data.windows import RandomWindows
from ava.errors import UserError

if TYPE_CHECKING:
    from datasets import Dataset, IterableDataset

MARKOV_CONCENTRATION = 0.5  # Dirichlet concentration of the Markov rows: peaked enough to be learnable
_READ_BATCH = 1024  # documents read (and tokenised) at a time from an in-memory source
_STDLIB_BATCH = 16  # stdlib files tokenised at a time (a few more than needed are read, no more)


@dataclass
class TrainingData:
    train: SequenceBatches | StreamingBatches | RandomWindows
    eval: SequenceBatches | None
    description: str
    entropy_rate: float | None = None  # nats/token, known exactly for the Markov corpus
    tokenizer: Tokenizer | None = None  # what turns the ids back into text; None for token files and Markov
    warnings: tuple[str, ...] = ()  # what the user must hear about the data, e.g. corrupt lines skipped


def cache_root(configured: str | None) -> Path:
    """`data.cache_dir`, else `$AVA_CACHE_DIR`, else `~/.cache/ava`."""
    return Path(configured or os.environ.get("AVA_CACHE_DIR") or Path.home() / ".cache" / "ava").expanduser()


def build_training_data(data: DataConfig, model_vocab: int, micro_batch: int, eval_batch: int, rank: int,
                        world_size: int, needed_sequences: int, max_steps: int | None = None,
                        accumulation: int = 1) -> TrainingData:
    """Batches for this rank.

    The data, the held-out set and the batch order do not depend on the run's
    length (see the module docstring). `needed_sequences` is only the nominal
    epoch of a stream, whose length is unknown; `max_steps` is
    `training.max_steps`, which a stream needs. In-memory and token-file
    batches cut their epochs in whole optimizer steps of `accumulation`
    micro-batches, so that what a step sees depends on the global batch only
    (`ava.data.batches`): a run can resume on another number of ranks.
    """
    built = _build(data, model_vocab, micro_batch, eval_batch, rank, world_size, needed_sequences, max_steps)
    if accumulation > 1 and isinstance(built.train, SequenceBatches | RandomWindows):
        built = dataclasses.replace(built, train=built.train.in_steps_of(accumulation))
    return built


def _build(data: DataConfig, model_vocab: int, micro_batch: int, eval_batch: int, rank: int,
           world_size: int, needed_sequences: int, max_steps: int | None) -> TrainingData:
    if data.data_dir is not None:
        return _token_files(data, model_vocab, micro_batch, eval_batch, rank, world_size)
    if data.sources:
        return _sources(data, model_vocab, micro_batch, eval_batch, rank, world_size, needed_sequences, max_steps)
    length = data.max_length
    if data.builtin_dataset == "markov":
        if data.markov_vocab_size > model_vocab:
            raise UserError(f"data.markov_vocab_size = {data.markov_vocab_size} exceeds model.vocab_size = "
                            f"{model_vocab}", "lower markov_vocab_size or raise model.vocab_size")
        corpus = MarkovCorpus(data.markov_vocab_size, seed=data.shuffle_seed, concentration=MARKOV_CONCENTRATION)
        tokens = corpus.sample(data.builtin_tokens, seed=data.shuffle_seed + 1)
        entropy = corpus.entropy_rate()
        description = f"built-in Markov corpus ({data.markov_vocab_size} tokens, entropy rate {entropy:.4f} nats/token)"
        return _in_memory(data, tokens[: tokens.size // length * length].reshape(-1, length), micro_batch,
                          eval_batch, rank, world_size, description, entropy=entropy)
    stdlib = {"builtin": "python_stdlib", "python": sys.version, "path": sysconfig.get_paths()["stdlib"]}
    tokenizer, tokenizer_text = _tokenizer(
        data, model_vocab, stdlib, lambda: round_robin_sample([python_stdlib_documents()], data.bpe_training_bytes))
    sequences = _stdlib_sequences(data, tokenizer)
    return _in_memory(data, sequences, micro_batch, eval_batch, rank, world_size,
                      f"built-in corpus: this Python's standard-library sources, {tokenizer_text}", tokenizer=tokenizer)


def _token_files(data: DataConfig, model_vocab: int, micro_batch: int, eval_batch: int, rank: int,
                 world_size: int) -> TrainingData:
    assert data.data_dir is not None
    directory, length = Path(data.data_dir), data.max_length
    if not directory.is_dir():
        raise UserError(f"data.data_dir = {directory} " + ("is a file, not a directory" if directory.exists()
                                                                   else "does not exist"),
                        "point data.data_dir at the directory holding train.bin and val.bin, or set "
                        "data_dir: null for data.sources or the built-in data")
    for name in ("train.bin", "val.bin"):
        if not (directory / name).is_file():
            raise UserError(f"data.data_dir = {directory} has no {name}",
                            "put train.bin and val.bin (uint16 token ids, nanoGPT layout) there, or set "
                            "data_dir: null for data.sources or the built-in data")
    train_tokens = open_token_file(directory / "train.bin", model_vocab)
    val_tokens = open_token_file(directory / "val.bin", model_vocab)
    held_out = np.asarray(val_tokens[: val_tokens.size // length * length], dtype=np.int64).reshape(-1, length)
    train: np.ndarray = train_tokens  # random windows read the memory map as they are drawn: no copy of train.bin
    if data.sampling == "packed":
        train = np.asarray(train_tokens[: train_tokens.size // length * length], dtype=np.int64).reshape(-1, length)
    return _batches(data, train, held_out, micro_batch, eval_batch, rank, world_size, f"token files in {directory}")


def _in_memory(data: DataConfig, sequences: np.ndarray, micro_batch: int, eval_batch: int, rank: int,
               world_size: int, description: str, entropy: float | None = None,
               tokenizer: Tokenizer | None = None) -> TrainingData:
    """Hold out the last max_eval_examples sequences (-1: 5%, never more than half) and batch the rest."""
    n_eval = data.max_eval_examples if data.max_eval_examples >= 0 else max(1, len(sequences) // 20)
    n_eval = min(n_eval, len(sequences) // 2)
    train, held_out = sequences[: len(sequences) - n_eval], sequences[len(sequences) - n_eval:]
    return _batches(data, train, held_out, micro_batch, eval_batch, rank, world_size, description, entropy, tokenizer)


def _batches(data: DataConfig, train: np.ndarray, held_out: np.ndarray, micro_batch: int, eval_batch: int, rank: int,
             world_size: int, description: str, entropy: float | None = None,
             tokenizer: Tokenizer | None = None) -> TrainingData:
    """Training batches of `train` (packed rows, or for random windows of a token file its flat tokens) and
    evaluation batches of the `held_out` rows."""
    train_batches: SequenceBatches | RandomWindows
    if data.sampling == "random_windows":
        stream = train.reshape(-1)  # packed rows joined back into the stream they were cut from
        if data.max_train_examples >= 0:
            stream = stream[: data.max_train_examples * data.max_length]
        train_batches = RandomWindows(stream, data.max_length, micro_batch, rank, world_size, data.shuffle_seed,
                                      data.reshuffle_each_epoch, pin_memory=_pin(data))
        trained = f"{stream.size:,} training tokens in random windows"
    else:
        if data.max_train_examples >= 0:
            train = train[: data.max_train_examples]
        train_batches = SequenceBatches(train, micro_batch, rank, world_size, data.shuffle_seed,
                                        data.reshuffle_each_epoch, drop_last=data.dataloader_drop_last,
                                        pin_memory=_pin(data))
        trained = f"{len(train)} training"
    eval_batches = None
    if len(held_out) >= eval_batch * world_size:
        eval_batches = SequenceBatches(held_out, eval_batch, rank, world_size, data.shuffle_seed, False)
    return TrainingData(train_batches, eval_batches, f"{description}: {trained} and {len(held_out)} "
                        f"held-out sequences of {data.max_length} tokens", entropy, tokenizer)


def _pin(data: DataConfig) -> bool:
    import torch

    return data.dataloader_pin_memory and torch.cuda.is_available()


def _stdlib_sequences(data: DataConfig, tokenizer: Tokenizer) -> np.ndarray:
    """The first `builtin_tokens` tokens of the stdlib (documents in sorted path order, each ended by eos), packed.

    As many whole rows as fit in `builtin_tokens`, so the corpus is the same for
    every run of this config, however long; fewer if the stdlib runs out first.
    """
    docs: list[np.ndarray] = []
    count = 0
    texts = stdlib_documents()
    while count < data.builtin_tokens:
        chunk = list(islice(texts, _STDLIB_BATCH))
        if not chunk:
            break
        for ids in encode_many(tokenizer, chunk):
            docs.append(ids)
            count += ids.size + 1
    rows = pack_documents(docs, data.max_length, tokenizer.eos_id)
    return rows[: data.builtin_tokens // data.max_length]


def _tokenizer(data: DataConfig, model_vocab: int, corpus: Any,
               documents: Callable[[], Iterable[str]]) -> tuple[Tokenizer, str]:
    """The tokenizer `tokenizer_name` asks for, checked against the model, and a phrase saying what it is.

    `corpus` identifies the data for the BPE cache; `documents` is read only when a BPE must be trained.
    """
    if data.tokenizer_name == BPE:
        if data.bpe_vocab_size is not None and data.bpe_vocab_size > model_vocab:
            raise UserError(f"data.bpe_vocab_size = {data.bpe_vocab_size} exceeds model.vocab_size = {model_vocab}",
                            f"set data.bpe_vocab_size <= {model_vocab}, or raise model.vocab_size")
        vocab = data.bpe_vocab_size or model_vocab
        if vocab < 257:
            raise UserError(f"model.vocab_size = {model_vocab} is too small for a byte-level BPE "
                            "(256 bytes + the end-of-text token)", "set model.vocab_size >= 257")
        directory = cache_root(data.cache_dir) / "tokenizers"
        bpe = cached_bpe(directory, corpus, vocab, data.bpe_training_bytes, documents)
        check_vocab(bpe, model_vocab, f"the BPE trained for data.tokenizer_name: bpe ({bpe.path})")
        return bpe, f"byte-level BPE tokenizer ({bpe.vocab_size} tokens, {bpe.path})"
    if data.tokenizer_name:
        loaded = load_tokenizer(data.tokenizer_name)
        check_vocab(loaded, model_vocab, "data.tokenizer_name")
        return loaded, f"tokenizer {loaded.path} ({loaded.vocab_size} tokens)"
    byte = ByteTokenizer()
    check_vocab(byte, model_vocab, "the byte tokenizer")
    return byte, "byte tokenizer"


def _texts(dataset: Dataset | IterableDataset) -> Iterator[str | None]:
    for batch in dataset.iter(batch_size=_READ_BATCH):
        yield from batch["text"]


def _sources(data: DataConfig, model_vocab: int, micro_batch: int, eval_batch: int, rank: int, world_size: int,
             needed_sequences: int, max_steps: int | None) -> TrainingData:
    if data.streaming:
        if data.sampling == "random_windows":
            raise UserError("data.sampling: random_windows cuts windows anywhere in the training tokens, and a "
                            "stream (data.streaming: true) is never held whole, so it has none to cut",
                            "set data.streaming: false to load data.sources into memory, train from token files "
                            "(data.data_dir), or use data.sampling: packed")
        if max_steps is None:
            raise UserError("data.streaming: true reads data.sources as a stream whose length is unknown, "
                            "so the run needs training.max_steps, and none was given",
                            "set training.max_steps, or data.streaming: false to load the sources into memory")
        if data.max_train_examples >= 0:
            raise UserError(f"data.max_train_examples = {data.max_train_examples} cannot cap a stream, "
                            "whose sequences are made on the fly",
                            "cap the documents read with data.max_samples, or set data.streaming: false")
        if data.max_eval_examples < 0:
            raise UserError("data.max_eval_examples = -1 (all) has no meaning for a stream",
                            "give the number of held-out sequences, e.g. 1000 (0 holds nothing out)")
    sources = [resolve_source(f"data.sources[{i}]", s.path, s.format, s.text_field, s.sample_by, s.weight)
               for i, s in enumerate(data.sources)]
    weighted = data.use_weighted_mixing and len(sources) > 1
    if not data.use_weighted_mixing:
        for source in sources:
            if source.weight is not None:
                raise UserError(f"{source.key}.weight is set but data.use_weighted_mixing is false, so sources "
                                "are concatenated and weights mean nothing",
                                f"set data.use_weighted_mixing: true, or remove {source.key}.weight")
    if weighted and data.streaming:
        _weights(sources, None)  # refuse missing weights before any file is opened
    skipped: list[str] = []
    for i, source in enumerate(sources):
        sources[i], notes = screened(source, data.bad_records, cache_root(data.cache_dir))
        skipped.extend(notes)
    loaded = [load_source(s, cache_root(data.cache_dir) / "datasets", data.streaming) for s in sources]
    tokenizer, tokenizer_text = _tokenizer(
        data, model_vocab, [s.fingerprint() for s in sources],
        lambda: round_robin_sample([_texts(d) for d in loaded], data.bpe_training_bytes))
    sizes = None if data.streaming else [len(d) for d in loaded]
    probabilities = None
    if weighted:
        probabilities = mixing_probabilities(_weights(sources, sizes), data.mixing_temperature)
    mixing_text = _mixing_text(sources, sizes, probabilities, data.mixing_temperature)
    if data.streaming:
        built = _streamed(data, sources, loaded, probabilities, tokenizer, micro_batch, eval_batch, rank,
                          world_size, needed_sequences, f"{mixing_text}; streamed; {tokenizer_text}")
    else:
        built = _loaded(data, loaded, probabilities, tokenizer, micro_batch, eval_batch, rank, world_size,
                        (mixing_text, tokenizer_text))
    return dataclasses.replace(built, warnings=tuple(skipped))


def _loaded(data: DataConfig, loaded: list[Any], probabilities: list[float] | None, tokenizer: Tokenizer,
            micro_batch: int, eval_batch: int, rank: int, world_size: int, texts: tuple[str, str]) -> TrainingData:
    """In-memory sources mixed, shuffled by document, tokenised, packed and split; `texts` describe mix and tokenizer."""
    mixed = mix(loaded, probabilities, data.shuffle_seed)
    if data.max_samples >= 0:
        mixed = mixed.select(range(min(data.max_samples, len(mixed))))
    # Shuffle documents before packing so that the held-out tail is a sample of every source.
    mixed = mixed.shuffle(seed=data.shuffle_seed)
    token_lists: list[np.ndarray] = []
    for batch in mixed.iter(batch_size=_READ_BATCH):
        token_lists.extend(encode_many(tokenizer, [text for text in batch["text"] if text]))
    sequences = pack_documents(token_lists, data.max_length, tokenizer.eos_id)
    description = f"{texts[0]}; {len(token_lists)} documents in memory; {texts[1]}"
    return _in_memory(data, sequences, micro_batch, eval_batch, rank, world_size, description, tokenizer=tokenizer)


def _streamed(data: DataConfig, sources: list[Source], loaded: list[Any], probabilities: list[float] | None,
              tokenizer: Tokenizer, micro_batch: int, eval_batch: int, rank: int, world_size: int,
              needed_sequences: int, description: str) -> TrainingData:
    shares = probabilities or [1.0 / len(sources)] * len(sources)
    held = hold_out_heads([_texts(d) for d in loaded], shares, [s.key for s in sources], tokenizer,
                          data.max_length, data.max_eval_examples)
    if held.digests:
        loaded = [d.filter(held.keeps, input_columns="text", batched=True) for d in loaded]
    mixed = mix(loaded, probabilities, data.shuffle_seed)
    documents = rank_documents(mixed, data.shuffle_seed, data.buffer_size, rank, world_size,
                               data.reshuffle_each_epoch, data.max_samples if data.max_samples >= 0 else None)
    depth = data.dataloader_num_workers * (data.dataloader_prefetch_factor or 2)
    train = StreamingBatches(documents, tokenizer, data.max_length, micro_batch,
                             max(1, needed_sequences // (micro_batch * world_size)), depth, _pin(data))
    eval_batches = None
    if len(held.rows) >= eval_batch * world_size:
        eval_batches = SequenceBatches(held.rows, eval_batch, rank, world_size, data.shuffle_seed, False)
    heads = ", ".join(f"{c} from {s.key}" for s, c in zip(sources, held.counts, strict=True))
    return TrainingData(train, eval_batches, f"{description}: {len(held.rows)} held-out sequences of "
                        f"{data.max_length} tokens (the first documents of each source: {heads})", tokenizer=tokenizer)


def _weights(sources: list[Source], sizes: list[int] | None) -> list[float]:
    """Each source's explicit weight, or its number of documents; a stream's is unknown, so it must be given."""
    keys = [s.key for s in sources]
    if sizes is None:
        missing = [s.key for s in sources if s.weight is None]
        if missing:
            raise UserError(
                f"{', '.join(k + '.weight' for k in missing)} not set: with data.streaming the number of documents "
                "in a source is unknown without reading all of it, so streamed sources are mixed by explicit weights",
                "give every source a weight (e.g. its number of documents or tokens), or set "
                "data.use_weighted_mixing: false to concatenate them, or data.streaming: false")
        sizes = [0] * len(sources)
    return chosen_weights([s.weight for s in sources], sizes, keys)


def _mixing_text(sources: list[Source], sizes: list[int] | None, probabilities: list[float] | None,
                 temperature: float) -> str:
    parts = []
    for i, source in enumerate(sources):
        facts = [source.builder] + ([f"{sizes[i]:,} documents"] if sizes else [])
        facts += [f"p = {probabilities[i]:.3f}"] if probabilities else []
        parts.append(f"{source.path} ({', '.join(facts)})")
    if probabilities is None:
        how = "concatenated" if len(sources) > 1 else "one source"
    else:
        basis = "weight" if sources[0].weight is not None else "documents"
        how = f"mixed by {basis}^(1/T), T = {temperature}"
    return f"data.sources, {how}: " + "; ".join(parts)
