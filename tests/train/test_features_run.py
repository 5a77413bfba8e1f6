"""train.py with all five enhanced features on, at a size a CPU trains in seconds (the reduced H100 preset)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO
from tests.train.run_helpers import TINY, run_env

ALL_FIVE = ["--model.use_moh", "true", "--model.moh.num_shared_heads", "1", "--model.moh.active_routed_heads", "2",
            "--model.use_moa", "true", "--model.moa.every_n_layers", "2", "--model.use_cross_attention", "true",
            "--model.use_rag", "true", "--model.rag.chunk_size", "32", "--model.use_episodic_memory", "true",
            "--model.episodic_memory.segment_length", "32"]
RUN = ["--max_steps", "12", "--max_length", "128", "--batch_size", "4", "--eval_batch_size", "4",
       "--max_eval_examples", "8", "--warmup_steps", "2", "--logging_steps", "4", "--eval_steps", "12"]


def _train(tmp_path, name):
    out = tmp_path / name
    done = subprocess.run([sys.executable, "train.py", *TINY, *RUN, *ALL_FIVE, "--data.cache_dir",
                           str(tmp_path / "cache"), "--output_dir", str(out)], cwd=REPO, env=run_env(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out, done.stdout


def test_all_five_features_train_from_the_store_ava_rag_build_index_made(tmp_path):
    # The datastore built ahead of time is the one train.py looks for: same rows, same initial embedding.
    ava = [sys.executable, "-m", "ava", "rag", "build-index", *TINY, *RUN, *ALL_FIVE, "--data.cache_dir",
           str(tmp_path / "cache")]
    built = subprocess.run(ava, cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    stores = list((tmp_path / "cache" / "rag").iterdir())
    assert len(stores) == 1 and (stores[0] / "manifest.json").is_file()
    out, stdout = _train(tmp_path, "run")
    assert "retrieval: built the datastore" not in stdout and f"in {stores[0]}" in stdout
    assert list((tmp_path / "cache" / "rag").iterdir()) == stores
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["checks_passed"]
    assert summary["final_loss"] < summary["first_loss"] - 1.0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = {k for r in records for k in r}
    assert {"moe/aux_loss", "moh/aux_loss", "moa/aux_loss", "router_loss", "grad_norm/cross_blocks"} <= logged


def test_a_missing_datastore_is_built_on_first_use_and_found_after(tmp_path):
    import numpy as np
    import torch

    from ava.config.schema.model import ModelConfig
    from ava.data.packing import pack_documents
    from ava.train.inputs.retrieval import RetrievalPlan

    cfg = ModelConfig(hidden_size=32, num_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=300,
                      max_position_embeddings=64, use_cross_attention=True, use_rag=True,
                      rag={"chunk_size": 16, "num_neighbours": 2})
    rng = np.random.default_rng(0)
    rows = pack_documents([rng.integers(0, 256, int(rng.integers(20, 90))) for _ in range(30)], 64, 256)
    embedding = torch.randn(300, 32, generator=torch.Generator().manual_seed(1))
    plan = RetrievalPlan(cfg, rows, 256, str(tmp_path / "cache"))
    notes: list[str] = []
    context = plan.open(embedding, 0, 1, notes.append)(torch.from_numpy(rows[:2]), torch.device("cpu"))
    assert any("built the datastore on first use" in n for n in notes)
    assert context is not None and context.neighbours is not None and context.neighbours.shape == (2, 4, 2, 32)
    stores = list((tmp_path / "cache" / "rag").iterdir())
    notes.clear()
    plan.open(embedding, 0, 1, notes.append)
    assert not any("built" in n for n in notes) and list((tmp_path / "cache" / "rag").iterdir()) == stores
    # Another initial embedding (another config or seed) gets its own store instead of reading this one.
    plan.open(embedding * 2, 0, 1, notes.append)
    assert len(list((tmp_path / "cache" / "rag").iterdir())) == 2


def test_document_ids_start_after_each_end_of_document_token():
    import torch

    from ava.train.inputs.batch_context import BatchContext, documents_from_eos

    tokens = torch.tensor([[5, 6, 9, 7, 9, 9, 8], [9, 1, 2, 3, 4, 5, 6]])
    expected = torch.tensor([[0, 0, 0, 1, 1, 2, 3], [0, 1, 1, 1, 1, 1, 1]])  # the eos (9) ends its own document
    assert torch.equal(documents_from_eos(tokens, 9), expected)
    context = BatchContext(None, 2, 9, memory=True)(tokens, torch.device("cpu"))
    assert context is not None and torch.equal(context.documents, expected) and context.neighbours is None
    assert BatchContext(None, 2, None, memory=True)(tokens, torch.device("cpu")) is None  # no eos known: one row
