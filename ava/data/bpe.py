"""A byte-level BPE tokenizer trained on the run's own corpus, and cached so it is trained once.

Byte-level (GPT-2 style): every string is encodable, with no unknown token, so
no document can fail to tokenise.  `<|endoftext|>` is its only special token;
packing puts it between documents.

The cache is keyed by a hash of what determines the result (the corpus's
files with their sizes and modification times, the vocabulary size, the
training budget, and this module's recipe version), so a second run with the
same data loads `tokenizer.json` instead of training, and changing any of
them trains a new one beside it.  A file lock makes concurrent ranks train it
once: the first trains, the others wait and load.  Training is deterministic,
but ranks on several machines must share the cache directory (or a
pre-trained tokenizer) to be sure they agree.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ava.data.tokenizer import FileTokenizer, load_tokenizer

if TYPE_CHECKING:
    from tokenizers import Tokenizer as HFTokenizer

EOS_TOKEN = "<|endoftext|>"
RECIPE_VERSION = 1  # bump when train_bpe changes what it produces: old cache entries then stop matching
MIN_FREQUENCY = 2  # a pair seen once is noise, not a unit worth a vocabulary slot


def train_bpe(texts: Iterable[str], vocab_size: int) -> HFTokenizer:
    """Train a byte-level BPE with `vocab_size` entries (fewer if the corpus runs out of pairs)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=MIN_FREQUENCY, special_tokens=[EOS_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def round_robin_sample(sources: Iterable[Iterable[str | None]], max_bytes: int) -> Iterator[str]:
    """Documents taken from each source in turn until `max_bytes` of text, so every source shapes the vocabulary.

    Empty documents are skipped; the document that crosses the budget is the last.
    """
    iterators = [iter(source) for source in sources]
    taken = 0
    while iterators and taken < max_bytes:
        for iterator in list(iterators):
            try:
                text = next(iterator)
            except StopIteration:
                iterators.remove(iterator)
                continue
            if not isinstance(text, str) or not text:
                continue
            taken += len(text.encode("utf-8"))
            yield text
            if taken >= max_bytes:
                return


def cache_key(corpus: Any, vocab_size: int, max_bytes: int) -> str:
    """A short hash of everything that determines the trained tokenizer; `corpus` must be JSON-serialisable."""
    settings = {"recipe": RECIPE_VERSION, "corpus": corpus, "vocab_size": vocab_size, "max_bytes": max_bytes,
                "eos": EOS_TOKEN, "min_frequency": MIN_FREQUENCY}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:20]


def cached_bpe(cache_dir: Path, corpus: Any, vocab_size: int, max_bytes: int,
               documents: Callable[[], Iterable[str]]) -> FileTokenizer:
    """The BPE for this corpus and settings from `cache_dir`, trained on `documents()` first if absent.

    `corpus` identifies the data (see `Source.fingerprint`); `documents` is only
    called on a cache miss, so a cached run reads no text for the tokenizer.
    """
    from filelock import FileLock

    directory = Path(cache_dir) / f"bpe-{cache_key(corpus, vocab_size, max_bytes)}"
    path = directory / "tokenizer.json"
    directory.mkdir(parents=True, exist_ok=True)
    with FileLock(str(directory / "train.lock")):
        if not path.is_file():
            tokenizer = train_bpe(documents(), vocab_size)
            partial = directory / "tokenizer.json.partial"
            tokenizer.save(str(partial))
            # What the entry was trained from, for a person wondering which cache entry is which.
            (directory / "settings.json").write_text(json.dumps(
                {"corpus": corpus, "vocab_size": vocab_size, "max_bytes": max_bytes, "recipe": RECIPE_VERSION},
                indent=2) + "\n")
            partial.replace(path)  # atomic: a reader sees no file or a whole one
    return load_tokenizer(path)
