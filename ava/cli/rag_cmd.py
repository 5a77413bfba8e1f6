"""`ava rag build-index`: the retrieval datastore of a training config's data."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from ava.cli.args import add_stack_arguments, new_parser, stack_from
from ava.config import load_config


def build_index_cmd(argv: Sequence[str]) -> int:
    parser = new_parser("ava rag build-index",
                        "Build the retrieval datastore (chunks, documents, embeddings, index) of the training data "
                        "a config's run would see; settings from model.rag (chunk_size, search, nlist, encoder, "
                        "encoder_dim, index_dir).")
    add_stack_arguments(parser)
    parser.add_argument("--output", default=None,
                        help="store directory (default: rag.index_dir, else <cache>/rag/<data and encoder "
                        "fingerprints>, where train.py looks)")
    parser.add_argument("--force", action="store_true", help="replace an existing store")
    ns, extras = parser.parse_known_args(argv)
    stack = stack_from(ns, extras)
    resolved = load_config(stack.files, stack.overrides, stack.world)
    import time

    from ava.data.setup import build_training_data
    from ava.rag.run_store import build_run_store
    from ava.rag.store import refuse_existing

    started = time.perf_counter()
    cfg = resolved.config
    if ns.output is not None:
        refuse_existing(_path(ns.output), ns.force)  # before the data is built
    b = resolved.batch
    # The same call as train.py's, planned world size and all, so that the store holds the very rows training sees.
    data = build_training_data(cfg.data, cfg.model.vocab_size, b.micro, cfg.data.eval_batch_size, 0, b.world.size,
                               needed_sequences=(cfg.training.max_steps or 1000) * b.global_batch,
                               max_steps=cfg.training.max_steps)
    info, source = build_run_store(resolved, data, _path(ns.output) if ns.output is not None else None, ns.force)
    eos_id = data.tokenizer.eos_id if data.tokenizer is not None else cfg.data.eos_token_id
    print(f"data: {data.description}")
    print(f"encoder: {source}")
    print(f"documents: {info.num_documents:,}" + ("" if eos_id is not None else " (no end-of-document token in "
                                                   "this data: each training row counts as one document)"))
    print(f"chunks: {info.num_chunks:,} of {info.chunk_size} tokens ({info.num_tokens:,} tokens)")
    index = (f"approximate, faiss IVF-Flat, nlist {info.nlist} (asked {cfg.model.rag.nlist})"
             if info.search == "approximate" else "exact")
    print(f"dim: {info.dim}; index: {index}; {info.bytes_on_disk / 2**20:.1f} MiB on disk")
    print(f"wrote {info.path} in {time.perf_counter() - started:.1f} s")
    return 0


def _path(text: str) -> Path:
    return Path(text).expanduser()


COMMANDS: dict[str, Callable[[Sequence[str]], int]] = {"build-index": build_index_cmd}
