"""configs/research/ trains as its headers say, shrunk to a few steps: retrieval is used, NVFP4 reports both losses."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO
from tests.train.run_helpers import run_env

SHORT = ["--max_steps", "3", "--warmup_steps", "1", "--logging_steps", "1", "--eval_steps", "3", "--max_length", "64",
         "--batch_size", "4", "--eval_batch_size", "4", "--max_eval_examples", "8", "--sample_max_new_tokens", "0"]


def _train(tmp_path: Path, name: str, *extra: str) -> tuple[Path, str, dict]:
    out = tmp_path / name
    done = subprocess.run([sys.executable, "train.py", "--config", f"configs/research/{name}.yaml",
                           "--hardware_config", "configs/hardware/cpu.yaml", *SHORT, *extra,
                           "--data.cache_dir", str(tmp_path / "cache"), "--output_dir", str(out)],
                          cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["checks_passed"], summary["checks"]
    return out, done.stdout, summary


def test_rag_enabled_trains_on_neighbours_retrieved_from_its_datastore(tmp_path):
    from safetensors.torch import load_file

    out, stdout, _ = _train(tmp_path, "rag_enabled", "--model.rag.chunk_size", "32")
    found = re.search(r"retrieval: ([\d,]+) chunks of 32 tokens in (\S+), 2 neighbours per chunk, exact search", stdout)
    assert found and int(found[1].replace(",", "")) > 0, stdout[-3000:]
    assert (Path(found[2]) / "manifest.json").is_file() and Path(found[2]).is_relative_to(tmp_path / "cache")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["grad_norm/cross_blocks"] > 0 for r in records if "loss" in r)
    # The gates start at exactly 0: they open only if the cross-attention blocks read non-empty neighbours.
    weights = load_file(str(out / "model" / "model.safetensors"))
    gates = {k: float(v.abs().max()) for k, v in weights.items() if k.startswith("cross_blocks.") and k.endswith("_gate")}
    assert len(gates) == 4 and all(g > 0 for g in gates.values()), gates


def test_quantization_nvfp4_reports_the_quantized_and_the_unquantized_held_out_loss(tmp_path):
    _, stdout, summary = _train(tmp_path, "quantization_nvfp4")
    q = summary["quantization"]
    assert (q["format"], q["method"], q["activations"], q["emulated"]) == ("nvfp4", "qat", True, True)
    assert q["modules"] == 42 and q["high_precision_modules"] == [
        "lm_head (output head: the logits feed the loss directly)"]  # 6 blocks x (q, k, v, o, gate, up, down)
    quantized, unquantized = q["quantized_eval_loss"], q["unquantized_eval_loss"]
    assert math.isfinite(quantized) and math.isfinite(unquantized) and quantized != unquantized
    assert q["degradation"] == quantized - unquantized
    # QAT evaluated the fake-quantized model at its last step; the torchao-converted model computes the same.
    assert abs(quantized - summary["eval_loss"]) < 1e-4
    assert q["quantized_weight_bytes"] < q["weight_bytes"] / 5  # fp32 -> 4-bit values with 8-bit block scales
    end_of_run = stdout.split("run checks:")[-1]  # printed again after the checks, where the user looks
    assert f"held-out loss {unquantized:.4f} unquantized, {quantized:.4f} in NVFP4 W4A4" in end_of_run
