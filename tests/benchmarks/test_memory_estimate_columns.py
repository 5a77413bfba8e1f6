"""The memory estimate beside what the benchmarks and the GPU check measure, like with like."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks.gpu_check.probes import RESULT_PREFIX, probe_memory_estimate
from benchmarks.gpu_check.report import GiB, memory_comparison
from benchmarks.scaling import Point, _build, _estimate, _memory
from benchmarks.zero_memory import THEORY, estimate_categories
from tests.conftest import REPO

TINY = str(REPO / "configs/gpu/tiny.yaml")


@pytest.mark.parametrize("stage", list(THEORY))
def test_zero_memory_estimate_equals_the_zero_theory_per_category(stage):
    psi = 13_116_672  # tiny.yaml
    estimate = estimate_categories(stage, TINY, [])
    theory = dict(zip(("parameters", "gradients", "optimizer"), THEORY[stage], strict=True))
    assert estimate == {k: pytest.approx(v * psi, rel=1e-6) for k, v in theory.items()}


def test_scaling_estimate_is_within_15_percent_of_the_measured_step():
    from benchmarks.model_step import loss_forward

    point = Point(seq=32, batch=2, experts=4, layers=2)
    model = _build(TINY, ["hidden_size=64", "num_attention_heads=4", "intermediate_size=64", "vocab_size=256"],
                   point, torch.device("cpu"))
    ids = torch.randint(0, 256, (point.batch, point.seq))
    measured = _memory(model, ids, loss_forward("fp32", torch.device("cpu")), 0)
    estimate = _estimate(model, point, "fp32")
    assert measured["activation_bytes"] == pytest.approx(estimate["estimate_activation_bytes"], rel=0.15)
    assert measured["state_bytes"] == pytest.approx(estimate["estimate_state_bytes"], rel=0.15)
    assert _estimate(model, point, "bf16") == {"estimate_activation_bytes": None, "estimate_state_bytes": None}


def test_gpu_check_holds_the_allocated_peak_to_the_estimate_without_its_margin(capsys):
    probe_memory_estimate(dry_run=True)
    line = capsys.readouterr().out.strip().splitlines()[-1]
    estimates = json.loads(line.removeprefix(RESULT_PREFIX))
    assert set(estimates) == {"train_dense_bf16", "train_dense_fp8", "train_moe_bf16", "train_moe_fp8"}
    estimate = estimates["train_moe_bf16"]
    assert estimate["total_bytes"] > estimate["allocated_bytes"] == sum(estimate["terms_bytes"].values())
    on_gpu = memory_comparison({"memory/peak_allocated_gb": 2 * estimate["allocated_bytes"] / GiB}, estimate)
    assert on_gpu["memory_peak_allocated_vs_estimate"] == pytest.approx(2.0)
    on_cpu = memory_comparison({"memory/max_rss_gb": 1.0}, estimate)  # the dry run: no CUDA peak to compare
    assert "memory_peak_allocated_vs_estimate" not in on_cpu and on_cpu["memory_estimate_largest"]
    assert memory_comparison({}, None) == {}
