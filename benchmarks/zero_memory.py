"""Per-rank bytes of parameters, gradients and optimizer state under ZeRO-1/2/3, against the theory.

For Adam with bf16 weights and an fp32 master copy, Ψ parameters cost 2Ψ bytes
of weights, 2Ψ of gradients and 12Ψ of optimizer state (fp32 master, m and v);
with N data-parallel ranks ZeRO-1 divides the optimizer state by N, ZeRO-2 the
gradients too, ZeRO-3 the weights as well (Rajbhandari et al., 2020). That
theory has no offload, so stages run with `deepspeed.cpu_offload: false`; the
variant `3+offload` runs the shipped ZeRO-3 config (optimizer on the CPU),
whose theory adds the 4Ψ/N fp32 gradient partition that DeepSpeed keeps for
the CPU Adam to read.

Each stage is a real 2-rank job under the deepspeed launcher (gloo on CPU). After
one full step and the backward pass of a second, each rank walks what it holds:
the module's weights (for ZeRO-3 its partitions, `ds_tensor`), the optimizer's
state and fp32 master partitions, and every gradient buffer DeepSpeed keeps
(tensors under its optimizer's `*grad*` attributes and `.grad` fields). Storage is
counted once: a memory range covered by several views (a flat buffer and the
parameters carved from it) counts once. The table gives measured / theory per category and the
process's peak resident memory.

Beside the theory, the estimate `ava config validate` and the dry run use
(`ava.model.memory_estimate`, from the config alone), like with like: its
weights (partitions; ZeRO-3's persistent small tensors are in its buffers
term), its gradients held after backward (with offload, the bf16 and fp32
partitions on the host, which the ledger counts as gradients) and its optimizer
state (fp32 master, m, v; not the fp32 gradient copy the step makes after
this measurement). One row is not like with like: ZeRO-1 holds the full
gradients until the reduce-scatter at the end of backward, which the estimate
counts (its peak) and the ledger, reading after it, does not.

    python benchmarks/zero_memory.py [--stages 1,2,3,3+offload] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.timing import print_table, write_json  # noqa: E402

RANKS = 2
THEORY = {"1": (2, 2, 12 / RANKS), "2": (2, 2 / RANKS, 12 / RANKS), "3": (2 / RANKS, 2 / RANKS, 12 / RANKS),
          "3+offload": (2 / RANKS, (2 + 4) / RANKS, 12 / RANKS)}
TARGET = 0.10  # within 10% of theory
ESTIMATE_TARGET = 0.15  # the memory estimate within 15% of the measurement


def _tensors(value: Any, depth: int = 0, with_grads: bool = True) -> Iterator[Any]:
    """Tensors reachable from `value` through lists, tuples and dicts (and their `.grad`s with `with_grads`)."""
    import torch

    if isinstance(value, torch.Tensor):
        yield value
        if with_grads and value.grad is not None:
            yield value.grad
    elif isinstance(value, dict) and depth < 4:
        for item in value.values():
            yield from _tensors(item, depth + 1, with_grads)
    elif isinstance(value, list | tuple) and depth < 4:
        for item in value:
            yield from _tensors(item, depth + 1, with_grads)


class _Ledger:
    """Bytes per category as the union of the memory ranges its tensors cover, minus ranges already claimed.

    Ranges, not storages: DeepSpeed carves parameters out of flat buffers (and,
    on CPU, out of large arenas), so a storage's size says little, while the
    union of [data_ptr, data_ptr + bytes) counts a flat buffer and its views once.
    """

    def __init__(self) -> None:
        self.claimed: list[tuple[int, int]] = []
        self.bytes: dict[str, int] = {}

    def claim(self, category: str, tensors: Iterator[Any]) -> None:
        ranges = _merge([(t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in tensors
                         if t.numel() > 0])
        fresh = _subtract(ranges, self.claimed)
        self.bytes[category] = self.bytes.get(category, 0) + sum(end - start for start, end in fresh)
        self.claimed = _merge(self.claimed + fresh)


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for start, end in sorted(ranges):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def _subtract(ranges: list[tuple[int, int]], taken: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """`ranges` (merged) with the parts inside `taken` (merged) removed."""
    out: list[tuple[int, int]] = []
    for start, end in ranges:
        cursor = start
        for t_start, t_end in taken:
            if t_end <= cursor or t_start >= end:
                continue
            if t_start > cursor:
                out.append((cursor, t_start))
            cursor = max(cursor, t_end)
        if cursor < end:
            out.append((cursor, end))
    return out


def _stack(stage: str, config: str, overrides: list[str]) -> tuple[Any, list[str]]:
    """The config files and overrides a stage's job trains with."""
    from ava.config import ConfigFiles

    files = ConfigFiles(config, str(REPO / "configs/hardware/cpu.yaml"),
                        str(REPO / f"configs/distributed/deepspeed_zero{stage[0]}.yaml"))
    offload = "true" if stage.endswith("+offload") else "false"
    return files, ["--deepspeed.cpu_offload", offload, "--mixed_precision", "bf16", "--batch_size", "2",
                   "--gradient_accumulation_steps", "1", "--max_length", "64", "--max_steps", "10",
                   "--warmup_steps", "1", *overrides]


def estimate_categories(stage: str, config: str, overrides: list[str]) -> dict[str, int]:
    """The memory estimate of a stage's job per rank, in the ledger's categories (see the module docstring)."""
    from ava.config import WorldSize, load_config
    from ava.model.memory_fit import check_run_memory

    cfg = load_config(*_stack(stage, config, overrides), WorldSize(RANKS, "benchmark")).config
    parts = check_run_memory(cfg.model, cfg.training, cfg.deepspeed, cfg.data.max_length, RANKS, None).estimate.parts

    def total(*names: str) -> int:
        return sum(parts.get(n, 0) + parts.get(f"{n} (host)", 0) for n in names)

    offload = cfg.deepspeed.cpu_offload and cfg.deepspeed.zero_stage >= 1
    return {"parameters": parts.get("weights (host)", 0) + total("weights.device"),
            "gradients": total("gradients.held") + parts.get("gradients (host)", 0)
            + (parts.get("optimizer.fp32_gradients (host)", 0) if offload else 0),
            "optimizer": total("optimizer.master", "optimizer.moments")}


def worker(ns: argparse.Namespace) -> int:
    """One rank: build the engine for `ns.stage`, train a step and a half, write what this rank holds."""
    import deepspeed
    import torch

    from ava.config import WorldSize, build_deepspeed_config, load_config
    from ava.model import AvaForCausalLM
    from ava.train.runtime.distributed import init_distributed

    cfg = load_config(*_stack(ns.stage, ns.config, ns.overrides), WorldSize(RANKS, "benchmark")).config
    process = init_distributed()
    torch.manual_seed(0)
    model = AvaForCausalLM(cfg.model)
    if cfg.deepspeed.zero_stage == 3 and cfg.model.is_moe:
        from ava.model.zero3 import mark_moe_zero3_leaves

        mark_moe_zero3_leaves(model)
    psi = sum(p.numel() for p in model.parameters())
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()),
                                           config=build_deepspeed_config(cfg))
    batch = torch.randint(0, cfg.model.vocab_size, (2, 64))
    engine.backward(engine(batch, labels=batch).loss)
    engine.step()
    engine.backward(engine(batch, labels=batch).loss)  # gradients held now; optimizer state since step 1
    ledger = _Ledger()
    weights = [getattr(p, "ds_tensor", p) for p in engine.module.parameters()]
    ledger.claim("parameters", iter(weights))
    basic = engine.optimizer.optimizer if hasattr(engine.optimizer, "optimizer") else engine.optimizer
    # The fp32 master weights are the basic optimizer's params, except under ZeRO-3, which puts each sub-group's
    # flat master into param_groups only while stepping it and empties the list after: read DeepSpeed's own list.
    masters = [getattr(engine.optimizer, name, []) for name in ("fp32_partitioned_groups_flat",
                                                                "single_partition_of_fp32_groups")]
    ledger.claim("optimizer", _tensors([list(basic.state.values()), [g["params"] for g in basic.param_groups],
                                        masters], with_grads=False))
    grads: list[Any] = [p.grad for p in engine.module.parameters() if p.grad is not None]
    grads.extend(m.grad for group in masters for m in group if m.grad is not None)  # offload's fp32 partition
    for name, value in vars(engine.optimizer).items():
        if "grad" in name:
            grads.extend(_tensors(value))
    ledger.claim("gradients", iter(grads))
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    Path(ns.out).joinpath(f"rank{process.rank}.json").write_text(json.dumps(
        {"rank": process.rank, "stage": ns.stage, "psi": psi, "bytes": ledger.bytes, "peak_rss": peak_rss,
         "optimizer": type(engine.optimizer).__name__}))
    # Leave together and tear the group down explicitly: a rank exiting with DeepSpeed's communication threads
    # still alive has ended in "terminate called without an active exception" (exit 250) on CPU.
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    return 0


def run_stage(stage: str, config: str, overrides: list[str]) -> list[dict[str, Any]]:
    """Launch the 2-rank job for `stage` and collect every rank's ledger."""
    from ava.train.runtime.rendezvous import free_port

    with tempfile.TemporaryDirectory() as out:
        env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"), "PYTHONPATH": str(REPO),
               "OMP_NUM_THREADS": "1"}
        for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(var, None)
        launcher = str(Path(sys.executable).parent / "deepspeed")
        done = subprocess.run([launcher, "--num_gpus", str(RANKS), "--master_port", str(free_port()),
                               str(Path(__file__).resolve()), "--worker", "--stage", str(stage), "--config", config,
                               "--out", out, *overrides], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=600)
        written = [Path(out) / f"rank{r}.json" for r in range(RANKS)]
        if not all(path.is_file() for path in written):
            raise SystemExit(f"ZeRO-{stage} job failed (exit {done.returncode}):\n{done.stdout[-3000:]}\n"
                             f"{done.stderr[-3000:]}")
        if done.returncode != 0:  # every rank had measured and written its ledger: the crash came after
            print(f"warning: the ZeRO-{stage} job exited {done.returncode} after every rank wrote its results: "
                  f"{done.stderr.strip().splitlines()[-1] if done.stderr.strip() else 'no message'}")
        return [json.loads(path.read_text()) for path in written]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", default="1,2,3,3+offload", help="comma-separated: " + ", ".join(THEORY))
    parser.add_argument("--config", default=str(REPO / "configs/gpu/tiny.yaml"))
    parser.add_argument("--json", default=None)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--stage", default="1", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    ns, overrides = parser.parse_known_args(argv)
    ns.overrides = overrides
    if ns.worker:
        return worker(ns)
    rows, results = [], []
    unknown = [s for s in ns.stages.split(",") if s not in THEORY]
    if unknown:
        parser.error(f"unknown --stages {', '.join(unknown)}; choose from {', '.join(THEORY)}")
    for stage in ns.stages.split(","):
        ranks = run_stage(stage, ns.config, overrides)
        psi = ranks[0]["psi"]
        theory = dict(zip(("parameters", "gradients", "optimizer"), THEORY[stage], strict=True))
        estimate = estimate_categories(stage, ns.config, overrides)
        for r in ranks:
            entry = {"stage": stage, "rank": r["rank"], "psi": psi, "peak_rss_bytes": r["peak_rss"],
                     "optimizer_class": r["optimizer"], "categories": {}}
            for category, per_param in theory.items():
                measured, expected, estimated = r["bytes"].get(category, 0), per_param * psi, estimate[category]
                like = not (stage == "1" and category == "gradients")  # see the module docstring
                entry["categories"][category] = {"measured_bytes": measured, "theory_bytes": expected,
                                                 "ratio": measured / expected, "estimate_bytes": estimated,
                                                 "measured_vs_estimate": measured / estimated,
                                                 "like_with_like": like}
                rows.append([f"ZeRO-{stage}", r["rank"], category, measured / 2**20, expected / 2**20,
                             measured / expected, estimated / 2**20,
                             f"{measured / estimated:.3f}" + ("" if like else " (peak)")])
            total = sum(c["measured_bytes"] for c in entry["categories"].values())
            total_theory = sum(c["theory_bytes"] for c in entry["categories"].values())
            total_estimate = sum(c["estimate_bytes"] for c in entry["categories"].values())
            entry["total"] = {"measured_bytes": total, "theory_bytes": total_theory, "ratio": total / total_theory,
                              "estimate_bytes": total_estimate, "measured_vs_estimate": total / total_estimate}
            rows.append([f"ZeRO-{stage}", r["rank"], "total", total / 2**20, total_theory / 2**20,
                         total / total_theory, total_estimate / 2**20, total / total_estimate])
            rows.append([f"ZeRO-{stage}", r["rank"], "peak RSS", r["peak_rss"] / 2**20, "", "", "", ""])
            results.append(entry)
    print(f"ZeRO memory per rank: {Path(ns.config).name} (Ψ = {psi:,} parameters), bf16 weights, Adam, "
          f"{RANKS} ranks; theory 2Ψ weights + 2Ψ gradients + 12Ψ optimizer, partitioned per stage; "
          "estimate: ava.model.memory_estimate from the config alone")
    print_table(["stage", "rank", "category", "measured MiB", "theory MiB", "measured / theory", "estimate MiB",
                 "measured / estimate"], rows)
    worst = max(abs(e["total"]["ratio"] - 1) for e in results)
    print(f"target: per-rank state within {TARGET:.0%} of theory: worst total {worst:.1%} off "
          f"({'met' if worst <= TARGET else 'NOT met'})")
    off = max(abs(c["measured_vs_estimate"] - 1) for e in results for c in e["categories"].values()
              if c["like_with_like"])
    print(f"target: the estimate within {ESTIMATE_TARGET:.0%} of the measurement in every like-with-like category: "
          f"worst {off:.1%} off ({'met' if off <= ESTIMATE_TARGET else 'NOT met'}); ZeRO-1 gradients: the estimate "
          "is the peak during backward, measured after the reduce-scatter")
    write_json(ns.json, {"benchmark": "zero_memory", "config": ns.config, "ranks": RANKS, "results": results,
                         "worst_total_deviation": worst, "target_met": worst <= TARGET,
                         "worst_estimate_deviation": off, "estimate_target_met": off <= ESTIMATE_TARGET})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
