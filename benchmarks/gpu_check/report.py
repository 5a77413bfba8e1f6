"""What a stage's outputs say: a training run's tokens/s and MFU, a pytest run's counts, one line per stage."""

from __future__ import annotations

import json
import statistics
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from benchmarks.gpu_check.plan import TrainSpec, mfu, training_flops_per_token


def read_run(out: Path, spec: TrainSpec, peak: dict[str, Any] | None, environment: dict[str, Any]) -> dict[str, Any]:
    """A train.py run's summary.json and metrics.jsonl, as the check records them.

    tokens/s is the median of the logged windows after the first, which holds
    compilation and warm-up. FLOPs per token are Ava's own count (the ratio of
    the logged mfu_flops_per_s to tokens_per_s), recorded beside the hand
    formula's; MFU is taken against the datasheet peak (bf16; fp8 runs also
    against the fp8 peak) and against the matmul rate measured on the device.
    """
    d = spec.dims
    details: dict[str, Any] = {"model": f"{'dense' if d.experts == 1 else f'MoE {d.experts}e top-{d.top_k}'}, "
                               f"{d.layers} layers, hidden {d.hidden}, seq {d.seq}, batch {d.batch}",
                               "precision": spec.precision, "tokens_per_step": d.seq * d.batch,
                               "flops_per_token_formula": training_flops_per_token(d)}
    metrics, summary = out / "metrics.jsonl", out / "summary.json"
    if summary.exists():
        s = json.loads(summary.read_text())
        details.update(run_status=s.get("status"), completed=s.get("status") == "completed", steps=s.get("steps"),
                       checks_passed=s.get("checks_passed"), checks=s.get("checks"),
                       params_total=(s.get("parameters") or {}).get("total"), final_loss=s.get("final_loss"),
                       first_loss=s.get("first_loss"), first_step_seconds=s.get("first_step_seconds"),
                       run_seconds=s.get("seconds"), precision_report=s.get("precision"))
        details.update({k: v for k, v in s.items() if k.startswith("memory/")})
    if not metrics.exists():
        return details
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    windows = [r for r in records if r.get("tokens_per_s") and "eval_loss" not in r]
    for r in records:  # the last record of each memory key: the run's peak so far
        details.update({k: v for k, v in r.items() if k.startswith("memory/")})
    steady = windows[1:] or windows
    if not steady:
        return details
    tps = statistics.median(r["tokens_per_s"] for r in steady)
    fpt = statistics.median(r["mfu_flops_per_s"] / r["tokens_per_s"] for r in steady)
    details.update(tokens_per_s=tps, tokens_per_s_windows=[round(r["tokens_per_s"], 1) for r in windows],
                   step_seconds=d.seq * d.batch / tps, flops_per_token_ava=fpt,
                   flops_ratio_ava_to_formula=fpt / details["flops_per_token_formula"])
    peak = peak or {}
    details["mfu_bf16_peak"] = mfu(tps, fpt, peak.get("bf16_flops"))
    details["mfu_fp8_peak"] = mfu(tps, fpt, peak.get("fp8_flops")) if spec.precision == "fp8" else None
    details["mfu_measured_matmul"] = mfu(tps, fpt, environment.get(f"matmul_{spec.precision}_flops")
                                         or environment.get("matmul_bf16_flops"))
    return details


GiB = 2**30


def memory_comparison(details: dict[str, Any], estimate: dict[str, Any] | None) -> dict[str, Any]:
    """Ava's memory estimate beside what the run measured, like with like.

    torch.cuda.max_memory_allocated (the run's memory/peak_allocated_gb) counts
    tensors only, so it is held to the estimate's terms without the margin
    (CUDA context, fragmentation); the reserved peak is recorded beside the
    estimate's total. On a CPU (the dry run) there is no allocated peak: the
    estimate is recorded alone.
    """
    if not estimate:
        return {}
    out: dict[str, Any] = {
        "memory_estimate_allocated_gb": estimate["allocated_bytes"] / GiB,
        "memory_estimate_total_gb": estimate["total_bytes"] / GiB,
        "memory_estimate_terms_gb": {k: v / GiB for k, v in estimate["terms_bytes"].items()},
        "memory_estimate_largest": estimate["largest"]}
    peak = details.get("memory/peak_allocated_gb")
    if peak:
        out["memory_peak_allocated_vs_estimate"] = peak / out["memory_estimate_allocated_gb"]
    reserved = details.get("memory/peak_reserved_gb")
    if reserved:
        out["memory_peak_reserved_vs_estimate_total"] = reserved / out["memory_estimate_total_gb"]
    return out


def junit_counts(path: Path) -> dict[str, Any]:
    """passed / failed / skipped and the failed tests' names, from pytest's --junitxml file."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failed = [f"{c.get('classname')}::{c.get('name')}" for c in root.iter("testcase")
              if c.find("failure") is not None or c.find("error") is not None]
    return {"passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
            "failed": counts["failures"] + counts["errors"], "skipped": counts["skipped"], "failed_tests": failed}


def headline(record: dict[str, Any]) -> str:
    """The stage's result in one line, for the console and the table."""
    d, name = record.get("details") or {}, record["name"]
    if name == "environment" and d:
        rate = d.get("matmul_bf16_flops")
        return (f"{d.get('gpu_name') or 'no GPU'}, torch {d.get('torch')}, CUDA {d.get('torch_cuda')}, "
                f"bf16 {d.get('bf16')}, fp8 {d.get('fp8')}"
                + (f", bf16 matmul {rate_text(rate)}" if rate else "")
                + (f", fp8 matmul {rate_text(d['matmul_fp8_flops'])}" if d.get("matmul_fp8_flops") else ""))
    if name == "wheels" and d:
        return f"{len(d.get('install', []))} to install, {len(d.get('unfit', []))} unfit, missing {d.get('missing')}"
    if name == "imports" and d:
        return f"DeepSpeed accelerator {d.get('deepspeed_accelerator')}"
    if name == "cuda_tests" and d:
        return f"{d.get('passed')} passed, {d.get('failed')} failed, {d.get('skipped')} skipped"
    if name == "deepspeed_ops" and d:
        return f"FusedAdam built in {d.get('build_seconds', 0):.0f} s"
    if name.startswith("train_") and d.get("tokens_per_s"):
        m = d.get("mfu_bf16_peak")
        return (f"{d['tokens_per_s']:,.0f} tokens/s, {d['step_seconds'] * 1000:.0f} ms/step"
                + (f", MFU {m:.1%} of bf16 peak" if m is not None else "")
                + (f" ({d['mfu_fp8_peak']:.1%} of fp8)" if d.get("mfu_fp8_peak") is not None else "")
                + (f", loss {d['first_loss']:.2f} -> {d['final_loss']:.2f}" if d.get("final_loss") is not None else "")
                + (f", peak {d['memory/peak_allocated_gb']:.1f} GiB allocated = "
                   f"{d['memory_peak_allocated_vs_estimate']:.2f} x the estimate"
                   if d.get("memory_peak_allocated_vs_estimate") else ""))
    return ""


def rate_text(flops: float) -> str:
    return f"{flops / 1e12:.1f} TFLOP/s" if flops >= 1e12 else f"{flops / 1e9:.1f} GFLOP/s"
