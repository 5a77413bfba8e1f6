"""`python -m benchmarks --quick` runs every benchmark end to end at toy sizes, so none of them rots.

The numbers of a quick run mean nothing and are not judged (no wall-clock
limits in tests); what is checked is that each benchmark ran, wrote its JSON,
and measured something positive and finite.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.__main__ import BENCHMARKS, main
from tests.conftest import REPO
from tests.train.run_helpers import run_env


def test_every_benchmark_runs_at_toy_size_and_reports(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--out", str(tmp_path)], cwd=REPO,
                          env=run_env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["quick"] is True
    assert {name: e["status"] for name, e in summary["benchmarks"].items()} == {b.name: "ok" for b in BENCHMARKS}
    assert "=== summary (--quick" in done.stdout
    step = json.loads((tmp_path / "model_step_moe.json").read_text())
    ava = next(r for r in step["results"] if r["model"] == "ava")
    assert step["moe"] and step["peer"] == "MixtralForCausalLM" and 0 < ava["mfu"] < 1
    assert math.isfinite(step["matmul_peak_flops"]) and step["matmul_peak_flops_bf16"] > 0
    dense = json.loads((tmp_path / "model_step_dense.json").read_text())
    assert not dense["moe"] and dense["peer"] == "LlamaForCausalLM"
    data = json.loads((tmp_path / "data_pipeline.json").read_text())
    assert data["data_tokens_per_s"] > 0 and data["train_tokens_per_s"] > 0
    zero = json.loads((tmp_path / "zero_memory.json").read_text())["results"]
    assert {(e["stage"], e["rank"]) for e in zero} == {("3", 0), ("3", 1)}
    weights = [e["categories"]["parameters"]["ratio"] for e in zero]
    assert weights == pytest.approx([1.0, 1.0], abs=0.01), "ZeRO-3 holds half the bf16 weights per rank"
    loops = json.loads((tmp_path / "train_throughput.json").read_text())["loops"]
    assert loops["ratio_of_minimums"] > 0 and loops["max_loss_difference"] < 0.1
    scaling = json.loads((tmp_path / "scaling.json").read_text())
    assert set(scaling["axes"]) == {"seq", "batch", "experts", "layers"} == set(scaling["summary"])
    measured = ("step_seconds", "tokens_per_s", "flops_per_step", "time_vs_predicted", "activation_bytes",
                "activation_vs_predicted", "state_bytes")
    for axis, points in scaling["axes"].items():
        assert len(points) >= 2 and points[0]["time_ratio"] == 1.0, axis
        for point in points:
            assert all(math.isfinite(point[key]) and point[key] > 0 for key in measured), (axis, point)
            assert point["state_vs_16_per_parameter"] == pytest.approx(1.0, rel=0.01), "fp32 AdamW: 16 bytes/param"
    experts = scaling["axes"]["experts"]
    assert experts[-1]["parameters"] > experts[0]["parameters"]
    features = {r["variant"]: r for r in json.loads((tmp_path / "features.json").read_text())["results"]}
    assert set(features) == {"off", "moh"} and features["moh"]["parameters"] > features["off"]["parameters"]
    assert all(math.isfinite(r["eval_loss"]) and r["tokens_per_s"] > 0 for r in features.values())
    assert experts[-1]["predicted_time_ratio"] == pytest.approx(1.0, abs=0.05), "top-k fixed: FLOPs stay flat"


def test_an_unknown_benchmark_name_is_refused(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--only", "model_stepp", "--out", "/nonexistent/never-written"])
    assert exit_info.value.code == 2
    assert "unknown benchmark(s) model_stepp; choose from model_step_moe" in capsys.readouterr().err
