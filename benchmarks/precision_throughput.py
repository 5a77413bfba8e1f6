"""Tokens/s of Ava's training step in fp32, bf16, fp8 tensorwise and fp8 rowwise: same model, same batches.

    python benchmarks/precision_throughput.py [--size cpu|gpu|gpu-moe] [--precisions fp32,bf16,fp8-tensorwise,fp8-rowwise]
        [--batch 8] [--seq 128] [--repeats 10] [--warmup 3] [--compile] [--one_at_a_time] [--json out.json]
        [--config configs/gpu/tiny.yaml] [--hardware_config ...] [--distributed_config ...] [--KEY VALUE ...]

One process, no launcher. Each precision gets its own DeepSpeed engine,
built as `ava.train.pretraining.train()` builds it: the same seed and model, then
`apply_precision`, then `deepspeed.initialize` with the DeepSpeed JSON of the
config resolved with `--mixed_precision` (and `--fp8_recipe`). A step is what
train() does per optimizer step with accumulation 1: forward inside the
precision's autocast, backward, optimizer step (and a device sync, so a step's
time is its own). The engines take turns, step by step, over the same list of
batches (interleaved, see timing.py), so machine noise hits all alike; tokens/s
is micro batch x sequence length over the fastest step (the median beside it).
The first step is timed on its own and reported beside them (and counts as one
of the warm-up steps): a one-time cost there, or a first step many times the
later ones, would otherwise hide behind the warm-up.
Each engine runs the same number of steps on the same batches, so their final
losses are comparable: printed as a check that the precisions did equal work.

Model sizes (`--size`, default gpu on CUDA, cpu otherwise; `--KEY VALUE` config
overrides change any of it):
- cpu: the tiny MoE (hidden 256, 4 layers, 4 experts top-2), 8 x 128 tokens.
- gpu: dense, hidden 2048, 8 layers, FFN 8192, vocab 32768, 4 x 2048 tokens.
- gpu-moe: the same attention with 8 experts of width 2048, top-2.
Target on an H100 (gpu size): fp8 >= 1.3x the tokens/s of bf16. On CPU FP8 is
emulated in software and slower than bf16; the numbers there check the code
path, not the speed.

`--compile` compiles each transformer block (torch.compile) after the
precision is applied: torchao's FP8 casts (amax, scale, cast) are separate
kernels in eager mode, which compile fuses. train() does not compile, so the
default measures what train() runs.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from ava.config import ConfigFiles, WorldSize, build_deepspeed_config, load_config  # noqa: E402
from benchmarks.timing import interleaved, print_table, write_json  # noqa: E402

PRECISIONS = {"fp32": ["--mixed_precision", "fp32"], "bf16": ["--mixed_precision", "bf16"],
              "fp8-tensorwise": ["--mixed_precision", "fp8", "--fp8_recipe", "tensorwise"],
              "fp8-rowwise": ["--mixed_precision", "fp8", "--fp8_recipe", "rowwise"]}
SIZES = {
    "cpu": {"hidden_size": 256, "num_layers": 4, "num_attention_heads": 4, "intermediate_size": 512,
            "vocab_size": 4096, "max_position_embeddings": 256, "num_experts": 4, "num_experts_per_token": 2,
            "batch": 8, "seq": 128},
    "gpu": {"hidden_size": 2048, "num_layers": 8, "num_attention_heads": 16, "intermediate_size": 8192,
            "vocab_size": 32768, "max_position_embeddings": 2048, "num_experts": 0, "batch": 4, "seq": 2048},
    "gpu-moe": {"hidden_size": 2048, "num_layers": 8, "num_attention_heads": 16, "intermediate_size": 2048,
                "vocab_size": 32768, "max_position_embeddings": 2048, "num_experts": 8, "num_experts_per_token": 2,
                "batch": 4, "seq": 2048},
}
TARGET = 1.3  # fp8 tokens/s over bf16's, on an H100


def _resolve(ns: argparse.Namespace, precision: str, overrides: list[str]) -> Any:
    preset = {k: v for k, v in SIZES[ns.size].items() if k not in ("batch", "seq")}
    flags = [x for key, value in preset.items() for x in (f"--{key}", str(value))]
    flags += ["--batch_size", str(ns.batch), "--gradient_accumulation_steps", "1", "--max_length", str(ns.seq),
              "--expert_capacity_factor", "0", "--eval_strategy", "no", "--save_strategy", "no"]
    files = ConfigFiles(ns.config, ns.hardware_config, ns.distributed_config)
    return load_config(files, [*flags, *overrides, *PRECISIONS[precision]], WorldSize(1, "benchmark: one process"))


class Engine:
    """One precision's model under DeepSpeed, and its training step."""

    def __init__(self, ns: argparse.Namespace, precision: str, overrides: list[str],
                 batches: list[torch.Tensor]) -> None:
        import deepspeed

        from ava.model import AvaForCausalLM
        from ava.train.engine.precision import apply_precision

        cfg = _resolve(ns, precision, overrides).config
        torch.manual_seed(ns.seed)
        model = AvaForCausalLM(cfg.model, gradient_checkpointing=cfg.training.gradient_checkpointing)
        if cfg.deepspeed.zero_stage == 3 and cfg.model.is_moe:
            from ava.model.zero3 import mark_moe_zero3_leaves

            mark_moe_zero3_leaves(model)
        self.report = apply_precision(model, cfg)
        if ns.compile:
            for block in model.layers:
                block.compile()
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
            config=build_deepspeed_config(cfg))
        self.device = next(self.engine.parameters()).device
        self.batches = [b.to(self.device) for b in batches]
        self.steps = 0
        self.loss = float("nan")

    def step(self) -> None:
        batch = self.batches[self.steps % len(self.batches)]
        self.steps += 1
        with self.report.autocast():
            out = self.engine(batch, labels=batch)
        self.engine.backward(out.loss)
        self.engine.step()
        self.loss = float(out.loss.detach())  # a host sync: the step's time includes all its device work


def _first_step(engine: Engine) -> float:
    """The time of `engine`'s first step: one-time costs (a first-call compilation, a kernel's set-up, a
    fallback chosen once) land here and nowhere else, and the warm-up steps would otherwise hide them."""
    start = time.perf_counter()
    engine.step()
    return time.perf_counter() - start


def _measure(engines: dict[str, Callable[[], Engine]], ns: argparse.Namespace
             ) -> dict[str, tuple[float, list[float], Engine]]:
    """Each engine's first step and its later step-time samples: interleaved, or (--one_at_a_time) each engine
    built, timed and freed in turn. The first step counts as one of the warm-up steps."""
    warmup = max(ns.warmup - 1, 0)
    if not ns.one_at_a_time:
        built = {name: make() for name, make in engines.items()}
        first = {name: _first_step(e) for name, e in built.items()}
        samples = interleaved({name: e.step for name, e in built.items()}, ns.repeats, warmup, statistic=list)
        return {name: (first[name], samples[name], built[name]) for name in engines}
    out = {}
    for name, make in engines.items():
        engine = make()
        first_s = _first_step(engine)
        out[name] = (first_s, interleaved({name: engine.step}, ns.repeats, warmup, statistic=list)[name], engine)
        engine.engine = None  # type: ignore[assignment]  # free the device memory before the next one
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--size", choices=sorted(SIZES), default="gpu" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precisions", default=",".join(PRECISIONS), help="comma-separated, from " + ", ".join(PRECISIONS))
    parser.add_argument("--batch", type=int, default=None, help="sequences per step (default: the size's)")
    parser.add_argument("--seq", type=int, default=None, help="tokens per sequence (default: the size's)")
    parser.add_argument("--repeats", type=int, default=10, help="timed steps per precision")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per precision first")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compile", action="store_true", help="torch.compile each transformer block")
    parser.add_argument("--one_at_a_time", action="store_true",
                        help="build, time and free one engine at a time (less memory; not interleaved)")
    parser.add_argument("--config", default=str(REPO / "configs/gpu/tiny.yaml"))
    parser.add_argument("--hardware_config", default=None,
                        help="default: configs/hardware/cpu.yaml without CUDA, none (auto) with it")
    parser.add_argument("--distributed_config", default=None, help="a ZeRO stage (default: the config's, ZeRO 0)")
    parser.add_argument("--json", default=None, help="write results to this JSON file")
    ns, overrides = parser.parse_known_args(argv)
    precisions = ns.precisions.split(",")
    if unknown := [p for p in precisions if p not in PRECISIONS]:
        parser.error(f"unknown precision(s) {unknown}: choose from {list(PRECISIONS)}")
    ns.batch = ns.batch or SIZES[ns.size]["batch"]
    ns.seq = ns.seq or SIZES[ns.size]["seq"]
    if ns.hardware_config is None and not torch.cuda.is_available():
        ns.hardware_config = str(REPO / "configs/hardware/cpu.yaml")
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is first imported
    from deepspeed.utils import logger as ds_logger

    from ava.train.runtime.distributed import init_distributed

    ds_logger.setLevel(logging.WARNING)  # one engine per precision: its INFO banner would bury the table
    init_distributed()
    cfg = _resolve(ns, "bf16", overrides).config
    gen = torch.Generator().manual_seed(ns.seed)
    batches = [torch.randint(0, cfg.model.vocab_size, (ns.batch, ns.seq), generator=gen) for _ in range(4)]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    m = cfg.model
    model = (f"hidden {m.hidden_size}, {m.num_layers} layers, FFN {m.intermediate_size}, vocab {m.vocab_size}, "
             + (f"{m.num_experts} experts top-{m.num_experts_per_token}" if m.is_moe else "dense"))
    print(f"training step on {device}: {model}; batch {ns.batch} x {ns.seq} tokens, ZeRO {cfg.deepspeed.zero_stage}, "
          f"{ns.repeats} timed steps after {ns.warmup} warm-up{', compiled blocks' if ns.compile else ''}", flush=True)
    makers = {p: (lambda p=p: Engine(ns, p, overrides, batches)) for p in precisions}
    measured = _measure(makers, ns)
    tokens = ns.batch * ns.seq
    base = "bf16" if "bf16" in measured else precisions[0]
    best = {name: min(samples) for name, (_, samples, _) in measured.items()}
    rows, results = [], {}
    for name, (first, samples, engine) in measured.items():
        median = statistics.median(samples)
        results[name] = {"first_step_ms": 1000 * first, "first_over_median": first / median,
                         "step_ms_min": 1000 * best[name], "step_ms_median": 1000 * median,
                         "tokens_per_s": tokens / best[name], "tokens_per_s_median": tokens / median,
                         f"speedup_vs_{base}": best[base] / best[name], "final_loss": engine.loss,
                         "precision": engine.report.as_dict()}
        r = results[name]
        rows.append([name, r["first_step_ms"], r["first_over_median"], r["step_ms_min"], r["step_ms_median"],
                     r["tokens_per_s"], r[f"speedup_vs_{base}"], engine.loss, "yes" if engine.report.emulated else ""])
    print_table(["precision", "first step ms", "first / median", "best step ms", "median step ms", "tokens/s",
                 f"x {base}", "final loss", "fp8 emulated"], rows)
    for name, (_, _, engine) in measured.items():
        for note in engine.report.notes[:1]:
            print(f"  {name}: {note}")
    verdict = {}
    for name in (p for p in measured if p.startswith("fp8") and "bf16" in measured):
        ratio = best["bf16"] / best[name]
        verdict[name] = ratio >= TARGET
        emulated = " -- FP8 emulated here" if measured[name][2].report.emulated else ""
        print(f"target (H100, gpu size): {name} >= {TARGET}x bf16 tokens/s: {ratio:.2f}x "
              f"({'met' if ratio >= TARGET else 'NOT met'}{emulated})")
    write_json(ns.json, {"benchmark": "precision_throughput", "device": device, "size": ns.size, "model": model,
                         "batch": ns.batch, "seq": ns.seq, "compile": ns.compile, "overrides": overrides,
                         "zero_stage": cfg.deepspeed.zero_stage, "results": results, "target_met": verdict})
    return 0


if __name__ == "__main__":
    sys.exit(main())
