"""The loss penalties in real runs: pre-training through `train.py` and the SFT stage through `train_rlhf.py`.

The formulas are pinned in tests/model/test_penalties.py and their effect on
samples in tests/model/test_penalty_effects.py; here: each run adds the terms
to what it backpropagates, logs each under its own name and keeps `lm_loss`
and the held-out loss the plain language-model loss.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.data.corpus import documents, write_jsonl
from tests.train.run_helpers import SMALL_RUN, TINY, run_env

PENALTIES = ["--repetition_penalty_weight", "0.5", "--immediate_repetition_weight", "1.0",
             "--min_sequence_length", "20", "--eos_penalty_weight", "5.0"]
NAMES = ["repetition_loss", "immediate_repetition_loss", "eos_loss"]


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_pretraining_adds_each_penalty_to_the_loss_and_logs_it_apart_from_lm_loss(tmp_path):
    out = tmp_path / "run"
    # Short documents that repeat a word: each 64-token row holds several, so every penalty has positions.
    docs = write_jsonl(tmp_path / "data" / "docs.jsonl", documents("w", 400, words=4))
    result = subprocess.run([sys.executable, "train.py", *TINY, *SMALL_RUN, *PENALTIES, "--max_steps", "8",
                             "--data.sources", f"[{{path: {docs}}}]", "--max_eval_examples", "8", "--eval_steps", "8",
                             "--output_dir", str(out)], cwd=REPO, env=run_env(),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    records = _records(out)
    steps = [r for r in records if "lm_loss" in r]
    assert [r["step"] for r in steps] == [4, 8]
    for record in steps:
        assert all(record[name] > 0 for name in NAMES), record
        # What was backpropagated: the language-model loss, the router loss and the three penalties.
        parts = record["lm_loss"] + record["router_loss"] + sum(record[name] for name in NAMES)
        assert record["loss"] == pytest.approx(parts, rel=1e-5)
    evaluations = [r for r in records if "eval_loss" in r]
    assert evaluations and not any(name in r for r in evaluations for name in NAMES)


def test_the_sft_stage_adds_the_penalties_on_the_response_and_logs_them(tmp_path):
    out = tmp_path / "rlhf"
    small = ["--hidden_size", "64", "--num_layers", "2", "--intermediate_size", "128", "--vocab_size", "257",
             "--max_position_embeddings", "64", "--max_length", "64", "--num_experts", "0"]
    result = subprocess.run(
        [sys.executable, "train_rlhf.py", *TINY, "--rlhf_config", "configs/rlhf/test_cpu.yaml", *small, *PENALTIES,
         "--min_sequence_length", "4", "--rlhf.stages", "[sft]", "--rlhf.sft.steps", "8",
         "--rlhf.sft.logging_steps", "4", "--rlhf.sft.eval_examples", "4", "--tensorboard_dir", "tb",
         "--output_dir", str(out)],
        cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "loss penalties on: repetition_loss, immediate_repetition_loss, eos_loss" in result.stdout
    # A logger key RLHF does not use says so instead of looking as if it worked.
    assert "WARNING: training.tensorboard_dir is not used by RLHF stages" in result.stdout
    steps = [r for r in _records(out) if r.get("stage") == "sft" and "loss" in r and "event" not in r]
    assert [r["step"] for r in steps] == [4, 8]
    for record in steps:
        # Digits answers repeat digits and are 6 long, so below min_sequence_length 4 the end token is pushed down.
        assert all(record[name] > 0 for name in NAMES), record


def test_an_eos_penalty_on_the_markov_corpus_which_has_no_documents_is_refused_with_the_fix(tmp_path):
    result = subprocess.run([sys.executable, "train.py", *TINY, *SMALL_RUN, "--eos_penalty_weight", "1.0",
                             "--max_steps", "2", "--output_dir", str(tmp_path / "run")], cwd=REPO, env=run_env(),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "training.eos_penalty_weight" in result.stderr + result.stdout and "Traceback" not in result.stderr
