"""`python -m benchmarks`: every benchmark in one run, one summary table, one JSON file per benchmark.

    python -m benchmarks [--quick] [--only model_step_moe,data_pipeline] [--out benchmarks/results]

Each benchmark runs as its own process (DeepSpeed keeps process-wide state, and
a crash in one must not take the others down), prints its own table as it goes,
and writes its JSON into --out; the summary at the end gives each one's headline
numbers and its targets, and `summary.json` collects them all. `--quick` runs
toy sizes in about a minute: the CI smoke test uses it so that no benchmark rots;
its numbers mean nothing. Exit status 1 if any benchmark failed to run (a target
that is not met is reported, not a failure).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TOY_MODEL = ["--model", "hidden_size=64", "--model", "num_layers=1", "--model", "intermediate_size=128",
             "--model", "num_attention_heads=4", "--model", "vocab_size=512"]
TOY_RUN = ["--hidden_size", "64", "--num_layers", "1", "--intermediate_size", "128", "--vocab_size", "512",
           "--max_length", "32", "--batch_size", "2", "--builtin_dataset", "markov"]


@dataclass(frozen=True)
class Benchmark:
    name: str
    script: str
    full: tuple[str, ...]
    quick: tuple[str, ...]
    headline: Callable[[dict[str, Any]], str]


def _model_step(result: dict[str, Any]) -> str:
    rows = {r["model"]: r for r in result["results"]}
    ava, compiled = rows["ava"], rows.get("ava compiled")
    text = (f"ava {ava['tokens_per_s']:,.0f} tokens/s = {result['speedup_vs_peer']:.2f}x {result['peer']} "
            f"(target 1.5x); MFU {ava['mfu']:.1%} of the measured {result['dtype']} matmul peak "
            f"{result['mfu_peak_flops'] / 1e9:.0f} GFLOP/s on {result['device']} (target 50% on CPU)")
    if compiled is not None:
        text += (f"; compiled {compiled['speedup_vs_peer']:.2f}x, MFU {compiled['mfu']:.1%} "
                 f"({result['compile_seconds']:.0f} s to compile)")
    return text


def _moe_layer(result: dict[str, Any]) -> str:
    rows = {(r["dtype"], r["layer"]): r for r in result["results"]}
    ava = rows.get(("fp32", "ava dropless"))
    if ava is None:
        return "no fp32 row"
    return (f"fp32 ava dropless = {ava['vs_dense']:.2f}x the equal-active dense FFN's time, DeepSpeed MoE "
            f"{ava['deepspeed_over_this']:.2f}x ava's")


def _train_throughput(result: dict[str, Any]) -> str:
    loops = result["loops"]
    health = loops.get("gradient_health_overhead") or {}
    text = f"ava loop / bare DeepSpeed = {loops['ratio_of_minimums']:.3f} per step (target <= 1.03)"
    if health:
        text += f"; gradient-health monitor on / off = {health['ratio_of_minimums']:.3f}"
    return text


def _precision(result: dict[str, Any]) -> str:
    return "; ".join(f"{name} {r['tokens_per_s']:,.0f} tokens/s" for name, r in result["results"].items())


def _zero_memory(result: dict[str, Any]) -> str:
    parts = [f"ZeRO-{e['stage']} {e['total']['measured_bytes'] / 2**20:.1f} MiB = {e['total']['ratio']:.2f}x theory"
             for e in result["results"] if e["rank"] == 0]
    return "; ".join(parts) + f" (rank 0; target within 10%: {'met' if result['target_met'] else 'NOT met'})"


def _data_pipeline(result: dict[str, Any]) -> str:
    return (f"data {result['data_tokens_per_s']:,.0f} tokens/s = {result['ratio']:,.0f}x training's "
            f"{result['train_tokens_per_s']:,.0f} (prepared in {result['prepare_seconds']:.1f} s)")


def _scaling(result: dict[str, Any]) -> str:
    summary = result["summary"]
    worst = ", ".join(f"{axis} {s['time_vs_predicted_worst']:.2f}" for axis, s in summary.items())
    activations = max(abs(s["activation_vs_predicted_worst"] - 1) for s in summary.values())
    text = f"step time / FLOP prediction, worst per axis: {worst}; activations within {activations:.1%} of prediction"
    if "seq" in summary:
        text += f"; attention {summary['seq']['attention_flops_share_last']:.0%} of FLOPs at seq {summary['seq']['last']}"
    return text


def _features(result: dict[str, Any]) -> str:
    rows = [r for r in result["results"] if r["variant"] != "off"]
    return (f"after {result['steps']} steps, held-out loss vs off: "
            + ", ".join(f"{r['variant']} {r['eval_loss_vs_off']:+.3f}" for r in rows)
            + "; tokens/s vs off: " + ", ".join(f"{r['variant']} {r['speed_vs_off']:.2f}x" for r in rows))


def _rank_threads(result: dict[str, Any]) -> str:
    return (f"{result['ranks']} ranks under OMP_NUM_THREADS={result['threads']}: step time {result['ratio']:.2f}x "
            f"OMP_NUM_THREADS=1's (target <= {result['target']})")


def _vs_plain(result: dict[str, Any]) -> str:
    return "; ".join(f"{r['shape']}: ava / plain PyTorch whole-run wall = {r['wall_ratio']:.2f} (target <= "
                     f"{r['target_ratio']}), held-out loss {r['eval_loss_delta']:+.4f}" for r in result["results"])


BENCHMARKS = (
    Benchmark("model_step_moe", "model_step.py", ("--profile",), ("--batch", "2", "--seq", "32", "--repeats", "2",
                                                      "--peak_size", "256", *TOY_MODEL), _model_step),
    Benchmark("model_step_dense", "model_step.py", ("--model", "num_experts=1"),
              ("--batch", "2", "--seq", "32", "--repeats", "2", "--peak_size", "256", *TOY_MODEL,
               "--model", "num_experts=1", "--no_compile"), _model_step),  # the MoE run checks compile
    Benchmark("moe_layer", "moe_layer.py", (), ("--tokens", "128", "--hidden", "64", "--expert_width", "128",
                                                "--experts", "4", "--repeats", "2", "--dtypes", "fp32"), _moe_layer),
    Benchmark("train_throughput", "train_throughput.py", ("--skip_cli", "--rounds", "3"),
              ("--skip_cli", "--steps", "4", "--rounds", "1", *TOY_RUN), _train_throughput),
    Benchmark("precision_throughput", "precision_throughput.py", ("--size", "cpu"),
              ("--size", "cpu", "--repeats", "2", "--warmup", "1", "--batch", "2", "--seq", "32",
               "--precisions", "fp32,bf16"), _precision),
    Benchmark("zero_memory", "zero_memory.py", (), ("--stages", "3", "--hidden_size", "64", "--num_layers", "1",
                                                    "--intermediate_size", "128", "--vocab_size", "512"), _zero_memory),
    Benchmark("data_pipeline", "data_pipeline.py", (),
              ("--batch", "2", "--seq", "32", "--batches", "20", "--repeats", "1",
               "--model_overrides", "--hidden_size 64 --num_layers 1 --intermediate_size 128"), _data_pipeline),
    Benchmark("scaling", "scaling.py", (), ("--batch", "2", "--seq", "16", "--seqs", "16,32,64", "--batches", "2,4,8",
                                            "--experts", "2,4,8", "--layers", "1,2,4", "--repeats", "1", *TOY_MODEL),
              _scaling),
    Benchmark("features", "features.py", ("--steps", "100"),
              ("--steps", "2", "--only", "moh", "--training.eval_steps", "2", "--data.max_eval_examples", "16"),
              _features),
    Benchmark("rank_threads", "rank_threads.py", (),
              ("--steps", "3", "--num_layers", "1", "--max_length", "32", "--batch_size", "2"), _rank_threads),
    Benchmark("vs_plain_pytorch", "vs_plain_pytorch.py", (),
              ("--shapes", "small", "--small_steps", "16", "--rounds", "1"), _vs_plain),
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="toy sizes, about a minute: checks every benchmark runs")
    parser.add_argument("--only", default="", help="comma-separated names: " + ", ".join(b.name for b in BENCHMARKS))
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"), help="directory for the JSON files")
    ns = parser.parse_args(argv)
    chosen = [b for b in BENCHMARKS if not ns.only or b.name in ns.only.split(",")]
    unknown = set(filter(None, ns.only.split(","))) - {b.name for b in BENCHMARKS}
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(sorted(unknown))}; choose from "
                     + ", ".join(b.name for b in BENCHMARKS))
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if "DS_ACCELERATOR" not in env and not _has_cuda():  # DeepSpeed finds a GPU itself; without one, say CPU
        env["DS_ACCELERATOR"] = "cpu"
    summary: dict[str, Any] = {"quick": ns.quick, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "benchmarks": {}}
    for bench in chosen:
        args = bench.quick if ns.quick else bench.full
        target = out / f"{bench.name}.json"
        target.unlink(missing_ok=True)
        print(f"\n=== {bench.name}: python benchmarks/{bench.script} {' '.join(args)}", flush=True)
        started = time.perf_counter()
        done = subprocess.run([sys.executable, str(REPO / "benchmarks" / bench.script), *args, "--json", str(target)],
                              cwd=REPO, env=env)
        seconds = time.perf_counter() - started
        entry: dict[str, Any] = {"seconds": seconds, "exit": done.returncode, "json": str(target)}
        if done.returncode == 0 and target.is_file():
            result = json.loads(target.read_text())
            entry.update(status="ok", headline=bench.headline(result))
        else:
            entry.update(status="failed", headline=f"exit status {done.returncode}")
        summary["benchmarks"][bench.name] = entry
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("\n=== summary" + (" (--quick: toy sizes, the numbers mean nothing)" if ns.quick else ""))
    width = max(len(name) for name in summary["benchmarks"])
    for name, entry in summary["benchmarks"].items():
        print(f"{name:<{width}}  {entry['status']:<6}  {entry['seconds']:6.1f} s  {entry['headline']}")
    print(f"results: {out}")
    return 0 if all(e["status"] == "ok" for e in summary["benchmarks"].values()) else 1


def _has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


if __name__ == "__main__":
    raise SystemExit(main())
