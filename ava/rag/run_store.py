"""The datastore of one training run's data: where it is, and building it from the run's own config.

Shared by `ava rag build-index` and by train.py, which builds the store on
first use when it is missing, so `use_rag: true` works the first time. It
takes the training data from `ava.data.setup` and the init_from weights from
`ava.hf.pretrained`, never from `ava.train`, which imports this package.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from ava.config.loader import ResolvedConfig
from ava.config.schema.model import RAGConfig
from ava.errors import UserError
from ava.rag.chunks import data_fingerprint
from ava.rag.store import StoreInfo, build_store, refuse_existing

if TYPE_CHECKING:
    import numpy as np
    import torch

    from ava.data.setup import TrainingData
    from ava.data.tokenizer import Tokenizer
    from ava.rag.encoder import ChunkEncoder


def training_rows(data: TrainingData) -> np.ndarray:
    """The packed training rows a store is built from; a stream has none."""
    from ava.data.batches import SequenceBatches

    if not isinstance(data.train, SequenceBatches):
        raise UserError("data.streaming: true reads the training data as a stream, which is never held in "
                        "memory, so there is no fixed set of training rows to build a retrieval store from",
                        "set data.streaming: false (load data.sources into memory), or train from token files "
                        "(data.data_dir)")
    return data.train.sequences


def store_dir(index_dir: str | None, cache_dir: str | None, rows: np.ndarray, encoder: ChunkEncoder) -> Path:
    """`rag.index_dir`, else `<cache>/rag/<data fingerprint>-<encoder fingerprint>`.

    Keyed by the encoder too, so a run whose model starts from another
    embedding (another config, seed or init_from) gets its own store instead
    of reading one whose vectors mean something else.
    """
    if index_dir is not None:
        return Path(index_dir).expanduser()
    from ava.data.setup import cache_root

    return cache_root(cache_dir) / "rag" / f"{data_fingerprint(rows)[:12]}-{encoder.fingerprint[:8]}"


def build_run_store(resolved: ResolvedConfig, data: TrainingData, output: Path | None = None, force: bool = False
                    ) -> tuple[StoreInfo, str]:
    """Build the store of `data`'s training rows (at `output`, else `store_dir`); also say where the encoder came from."""
    rag = resolved.config.model.rag
    encoder, source = chunk_encoder(resolved, rag, data.tokenizer)
    rows = training_rows(data)
    out_dir = output or store_dir(rag.index_dir, resolved.config.data.cache_dir, rows, encoder)
    refuse_existing(out_dir, force)
    eos_id = data.tokenizer.eos_id if data.tokenizer is not None else resolved.config.data.eos_token_id
    info = build_store(rows, eos_id, encoder, out_dir, rag.chunk_size, rag.search, rag.nlist, force=force)
    return info, source


def chunk_encoder(resolved: ResolvedConfig, rag: RAGConfig, tokenizer: Tokenizer | None) -> tuple[ChunkEncoder, str]:
    """The chunk encoder rag.encoder names for a run (built here), and a phrase saying where its weights came from."""
    if rag.encoder != "embedding":
        return make_encoder(rag, None, tokenizer.decode if tokenizer else None), f"Hugging Face encoder {rag.encoder}"
    table, source = initial_token_embedding(resolved)
    return make_encoder(rag, table, None), source


def make_encoder(rag: RAGConfig, embedding: torch.Tensor | None,
                 decode: Callable[[list[int]], str] | None) -> ChunkEncoder:
    """`rag.encoder: embedding` from the token embedding the run starts from, else the local HF encoder."""
    from ava.rag.encoder import EmbeddingEncoder, HFEncoder

    if rag.encoder == "embedding":
        assert embedding is not None
        return EmbeddingEncoder.from_embedding(embedding, rag.encoder_dim)
    if decode is None:
        raise UserError(f"rag.encoder = {rag.encoder} reads text, but this data has no tokenizer to turn "
                        "its token ids back into text (token files, the Markov corpus)",
                        "use rag.encoder: embedding, or data.sources / the built-in text corpus")
    return HFEncoder(rag.encoder, decode)


def initial_token_embedding(resolved: ResolvedConfig) -> tuple[torch.Tensor, str]:
    """The token embedding the run starts from: init_from's, else the seeded initialisation training makes."""
    import torch

    cfg = resolved.config
    if cfg.training.init_from is not None:
        from ava.config.pretrained import locate
        from ava.hf.pretrained import load_weights

        pretrained = locate(cfg.training.init_from)  # a missing directory is the user error train.py gives too
        return load_weights(pretrained)["embed_tokens.weight"], f"the token embedding of {pretrained.describe()}"
    from ava.model import AvaForCausalLM

    torch.manual_seed(cfg.data.shuffle_seed)  # as ava.train.pretraining.train does before it builds the model
    model = AvaForCausalLM(cfg.model)
    return (model.embed_tokens.weight.detach(),
            f"the model's initial token embedding (seed data.shuffle_seed = {cfg.data.shuffle_seed})")
