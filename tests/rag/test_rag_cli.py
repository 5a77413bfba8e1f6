"""`ava rag build-index` end to end on the built-in corpus with the tiny config."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from ava.rag import data_fingerprint, encoder_fingerprint
from tests.conftest import REPO

CONFIG = ("--config", "configs/gpu/tiny.yaml", "--hardware_config", "configs/hardware/cpu.yaml")
SMALL = ("--training.max_steps", "5", "--training.warmup_steps", "1", "--data.max_length", "64")


def _ava(*args: str, cache) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "AVA_CACHE_DIR": str(cache), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "ava", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env=env)


@pytest.mark.slow
def test_build_index_writes_the_store_of_the_training_rows_and_refuses_to_overwrite_it(tmp_path):
    from ava.config import ConfigFiles, WorldSize, load_config
    from ava.data.setup import build_training_data
    from ava.model import AvaForCausalLM

    built = _ava("rag", "build-index", *CONFIG, *SMALL, cache=tmp_path)
    assert built.returncode == 0, built.stderr
    for needle in ("chunks: ", "documents: ", "dim: 256", "index: exact", "MiB on disk", "wrote "):
        assert needle in built.stdout

    # The store holds the rows training would see, under <cache>/rag/<data>-<encoder fingerprints>, with
    # training's initial embedding.
    resolved = load_config(ConfigFiles(*CONFIG[1::2]), SMALL, WorldSize.detect())
    cfg, b = resolved.config, resolved.batch
    data = build_training_data(cfg.data, cfg.model.vocab_size, b.micro, cfg.data.eval_batch_size, 0, b.world.size,
                               needed_sequences=5 * b.global_batch, max_steps=5)
    rows = data.train.sequences
    torch.manual_seed(cfg.data.shuffle_seed)
    table = encoder_fingerprint(AvaForCausalLM(cfg.model).embed_tokens.weight)
    store = tmp_path / "rag" / f"{data_fingerprint(rows)[:12]}-{table[:8]}"
    manifest = json.loads((store / "manifest.json").read_text())
    assert manifest["num_chunks"] == rows.size // 64 and manifest["eos_id"] == 256
    assert manifest["encoder"]["fingerprint"] == table
    assert f"wrote {store}" in built.stdout

    again = _ava("rag", "build-index", *CONFIG, *SMALL, cache=tmp_path)
    assert again.returncode == 2 and "Traceback" not in again.stderr
    assert "already holds a retrieval store" in again.stderr and "--force" in again.stderr
    assert json.loads((store / "manifest.json").read_text())["created"] == manifest["created"]


def test_build_index_into_a_non_store_directory_fails_before_any_work(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    result = _ava("rag", "build-index", *CONFIG, *SMALL, "--output", str(tmp_path / "out"), "--force",
                  cache=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "holds no retrieval store" in result.stderr and (tmp_path / "out" / "keep.txt").exists()


@pytest.mark.slow
def test_build_index_encodes_with_the_embedding_of_training_init_from(tmp_path):
    from ava.config.schema.model import ModelConfig
    from ava.config.yaml_loader import load_yaml_file
    from ava.model import AvaForCausalLM
    from ava.model.store import save_model_dir

    torch.manual_seed(123)  # not the seed the run would initialise with: the store must take these weights
    model = AvaForCausalLM(ModelConfig.model_validate(load_yaml_file(REPO / CONFIG[1]).data["model"]))
    save_model_dir(model, tmp_path / "pretrained")
    result = _ava("rag", "build-index", *CONFIG, *SMALL, "--training.init_from", str(tmp_path / "pretrained"),
                  "--output", str(tmp_path / "store"), cache=tmp_path)
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "store" / "manifest.json").read_text())
    assert manifest["encoder"]["fingerprint"] == encoder_fingerprint(model.embed_tokens.weight)
