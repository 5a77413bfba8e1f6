"""Whole-model training-step throughput: Ava against Hugging Face Mixtral (and Llama), same run.

    python benchmarks/model_step.py [--config configs/gpu/tiny.yaml] [--batch 8] [--seq 128] [--json out.json]

Both models get identical dimensions and identical initial weights (Ava's are
exported to the Hugging Face layout), the same batches and the same optimizer
(torch AdamW). A step is forward, loss (including each model's router
auxiliary loss), backward and optimizer step. MoE configs compare against
MixtralForCausalLM and, for reference, the dense LlamaForCausalLM with the
same attention and an FFN of the MoE's active width.
Target: Ava >= 1.5x the tokens/s of HF Mixtral.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import yaml  # noqa: E402

from ava.config.schema.model import ModelConfig  # noqa: E402
from ava.config.yaml_loader import load_yaml_file  # noqa: E402
from ava.hf import export_hf  # noqa: E402
from ava.model import AvaForCausalLM  # noqa: E402
from ava.model.summary import summarise_model  # noqa: E402
from ava.train.engine.host_memory import keep_freed_memory  # noqa: E402
from benchmarks.timing import interleaved, print_table, synchronised, write_json  # noqa: E402


def _model_config(path: str, settings: list[str]) -> ModelConfig:
    """The model: section of a config file, made Mixtral-representable (dropless, topk, no dropout).

    `settings` are KEY=VALUE changes on top (e.g. num_experts=1 for the dense variant, toy sizes for smoke tests).
    """
    data = dict(load_yaml_file(path).data.get("model", {}))
    for setting in settings:
        key, _, value = setting.partition("=")
        data[key] = yaml.safe_load(value)
    data.update(expert_capacity_factor=None, router_type="topk", attention_dropout=0.0, hidden_dropout=0.0,
                position_embedding_type="rope", norm_type="rmsnorm", activation="swiglu", use_bias=False,
                shared_expert_intermediate_size=0)
    for flag in ("use_moh", "use_moa", "use_rag", "use_cross_attention", "use_episodic_memory"):
        data[flag] = False
    return ModelConfig.model_validate(data)


def matmul_peak_flops(n: int = 2048, repeats: int = 5, dtype: torch.dtype = torch.float32,
                      device: torch.device | str = "cpu") -> float:
    """This machine's matmul FLOP/s in `dtype` on `device`, measured now: the denominator of MFU."""
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    sec = interleaved({"mm": synchronised(lambda: a @ b, torch.device(device))}, repeats)["mm"]
    return 2 * n**3 / sec


Forward = Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]


def loss_forward(dtype: str, device: torch.device) -> Forward:
    """The loss of a batch: fp32, or bf16 autocast around the forward (weights and optimizer stay fp32)."""
    def forward(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
        cast = torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bf16" else nullcontext()
        with cast:
            return model(ids, labels=ids).loss
    return forward


def profile_step(step: Callable[[], None], device: torch.device, repeats: int = 3) -> dict[str, float]:
    """Milliseconds per step of self time (CPU, or GPU kernel time on CUDA) by kind: matmul, attention, optimizer, rest.

    What explains a throughput ratio between models with equal FLOPs: if both
    spend most of a step in the same matmuls, the rest (elementwise kernels,
    copies, routing) bounds how far apart they can be.
    """
    from torch.profiler import ProfilerActivity, profile

    for _ in range(2):
        step()
    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]) as prof:
        for _ in range(repeats):
            step()
    kinds: dict[str, float] = {"matmul": 0.0, "attention": 0.0, "optimizer": 0.0, "other": 0.0}
    for event in prof.key_averages():
        op = event.key.removeprefix("aten::")
        if op in ("mm", "addmm", "bmm", "_grouped_mm", "baddbmm"):
            kind = "matmul"
        elif "scaled_dot_product" in op or "flash_attention" in op:
            kind = "attention"
        elif op.startswith(("_foreach", "_fused_adam", "Optimizer.")):
            kind = "optimizer"
        else:
            kind = "other"
        kinds[kind] += (event.self_device_time_total if cuda else event.self_cpu_time_total) / 1000 / repeats
    return kinds


def _train_step(model: torch.nn.Module, batches: list[torch.Tensor], forward: Callable) -> Callable[[], None]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    state = {"i": 0}

    def step() -> None:
        ids = batches[state["i"] % len(batches)]
        state["i"] += 1
        loss = forward(model, ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def _contenders(cfg: ModelConfig, ava: AvaForCausalLM, ns: argparse.Namespace, device: torch.device,
                batches: list[torch.Tensor]) -> tuple[dict[str, Callable[[], None]], type, float | None]:
    """Each model's training step (Ava eager and compiled, the HF peers), the peer's class, the compile time."""
    import transformers

    forward = loss_forward(ns.dtype, device)

    def step_of(model: torch.nn.Module) -> Callable[[], None]:
        return synchronised(_train_step(model, batches, forward), device)

    steps = {"ava": step_of(ava)}
    compile_seconds = None
    if not ns.no_compile:
        compiled = AvaForCausalLM(cfg).to(device).train()
        compiled.load_state_dict(ava.state_dict())
        compiled.use_compiled_blocks()
        started = time.perf_counter()
        steps["ava compiled"] = step_of(compiled)
        steps["ava compiled"]()  # compile outside the timing (the warm-up steps would absorb it anyway)
        compile_seconds = time.perf_counter() - started
    peer_cls = transformers.MixtralForCausalLM if cfg.is_moe else transformers.LlamaForCausalLM
    with tempfile.TemporaryDirectory() as tmp:
        export_hf(ava, tmp)
        peers = {peer_cls.__name__: peer_cls.from_pretrained(tmp, attn_implementation="sdpa")}
        if cfg.is_moe:  # transformers >= 5 defaults to grouped_mm experts; "eager" is its loop over experts
            peers[f"{peer_cls.__name__} (eager experts)"] = peer_cls.from_pretrained(
                tmp, attn_implementation="sdpa", experts_implementation="eager")
    if cfg.is_moe:
        dense_cfg = transformers.LlamaConfig(
            vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
            intermediate_size=cfg.num_experts_per_token * cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.kv_heads,
            max_position_embeddings=cfg.max_position_embeddings, attn_implementation="sdpa")
        peers["LlamaForCausalLM (dense, equal active)"] = transformers.LlamaForCausalLM(dense_cfg)
    for name, model in peers.items():
        model.config.output_router_logits = cfg.is_moe  # HF adds its aux loss, as Ava adds its router losses
        steps[name] = step_of(model.to(device).train())
    return steps, peer_cls, compile_seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs/gpu/tiny.yaml"))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--model", action="append", default=[], metavar="KEY=VALUE",
                        help="change a model setting, e.g. --model num_experts=1 (dense) --model hidden_size=64")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default=None,
                        help="fp32, or bf16 autocast (fp32 weights); default bf16 on a GPU, fp32 on CPU")
    parser.add_argument("--peak_size", type=int, default=2048, help="matrix size of the matmul peak measurement")
    parser.add_argument("--no_compile", action="store_true",
                        help="leave out the 'ava compiled' row (training.compile: true; compiling takes 5-60 s)")
    parser.add_argument("--profile", action="store_true",
                        help="also profile a few steps of each model: time per step in matmuls vs the rest")
    parser.add_argument("--json", default=None)
    ns = parser.parse_args(argv)
    try:
        import transformers
    except ImportError:
        print("transformers is not installed (pip install -e .[dev]); nothing to compare against")
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ns.dtype = ns.dtype or ("bf16" if device.type == "cuda" else "fp32")
    cfg = _model_config(ns.config, ns.model)
    # As train.py does on CPU, for every model alike (one process): no page faults for re-allocated activations.
    kept = device.type == "cpu" and keep_freed_memory()
    torch.manual_seed(0)
    ava = AvaForCausalLM(cfg).to(device).train()
    summary = summarise_model(ava, ns.seq)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, cfg.vocab_size, (ns.batch, ns.seq), generator=gen).to(device) for _ in range(4)]
    steps, peer_cls, compile_seconds = _contenders(cfg, ava, ns, device, batches)
    print(f"training step: {Path(ns.config).name} model ({summary.total / 1e6:.1f}M parameters, "
          f"{summary.active_per_token / 1e6:.1f}M active), batch {ns.batch} x {ns.seq} tokens, {ns.dtype} on "
          f"{device.type}, {torch.get_num_threads()} threads, transformers {transformers.__version__}"
          + (", freed host memory kept (hardware.keep_freed_host_memory)" if kept else ""))
    times = interleaved(steps, ns.repeats)
    peak = matmul_peak_flops(ns.peak_size, device=device)
    peak_bf16 = matmul_peak_flops(ns.peak_size, dtype=torch.bfloat16, device=device)
    mfu_peak = peak_bf16 if ns.dtype == "bf16" else peak
    tokens = ns.batch * ns.seq
    rows, results = [], []
    for name, sec in times.items():
        tps = tokens / sec
        ratio = times[peer_cls.__name__] / sec
        ours = name.startswith("ava")
        mfu = summary.training_flops_per_token * tps / mfu_peak if ours else float("nan")
        rows.append([name, 1000 * sec, tps, ratio, mfu])
        results.append({"model": name, "step_ms": 1000 * sec, "tokens_per_s": tps, "speedup_vs_peer": ratio,
                        "mfu": mfu if ours else None})
    print_table(["model", "best step ms", "tokens/s", f"x {peer_cls.__name__}", "MFU"], rows)
    print(f"MFU = {summary.training_flops_per_token / 1e6:.1f} MFLOP/token (ava model summary) x tokens/s / "
          f"measured {ns.dtype} matmul peak {mfu_peak / 1e9:.0f} GFLOP/s (fp32 peak: {peak / 1e9:.0f}, bf16 peak: "
          f"{peak_bf16 / 1e9:.0f} GFLOP/s)")
    if compile_seconds is not None:
        print(f"ava compiled: the blocks under torch.compile (training.compile: true), {compile_seconds:.1f} s "
              "to compile; eager is what training.compile: auto runs on CPU")
    profiles = _print_profiles(steps, peer_cls.__name__, device) if ns.profile else {}
    ratio = times[peer_cls.__name__] / times["ava"]
    best = times[peer_cls.__name__] / min(t for name, t in times.items() if name.startswith("ava"))
    print(f"target: ava >= 1.5x {peer_cls.__name__} tokens/s: eager {ratio:.2f}x, best {best:.2f}x "
          f"({'met' if best >= 1.5 else 'NOT met'})")
    write_json(ns.json, {"benchmark": "model_step", "config": ns.config, "model_settings": ns.model,
                         "moe": cfg.is_moe, "batch": ns.batch, "seq": ns.seq, "dtype": ns.dtype,
                         "device": device.type, "matmul_peak_flops": peak, "matmul_peak_flops_bf16": peak_bf16,
                         "mfu_peak_flops": mfu_peak, "peer": peer_cls.__name__,
                         "speedup_vs_peer": ratio, "best_speedup_vs_peer": best, "compile_seconds": compile_seconds,
                         "profiles_ms": profiles or None, "results": results})
    return 0


def _print_profiles(steps: dict[str, Callable[[], None]], peer: str, device: torch.device) -> dict[str, dict]:
    profiles = {name: profile_step(steps[name], device) for name in ("ava", peer)}
    print_table(["model (profiled)", *(f"{kind} ms" for kind in profiles["ava"]), "total ms", "matmul share"],
                [[name, *p.values(), sum(p.values()), p["matmul"] / sum(p.values())] for name, p in profiles.items()])
    peer_total = sum(profiles[peer].values())
    print(f"{peer}'s whole step takes {peer_total:.0f} ms; 1.5x it is {peer_total / 1.5:.0f} ms, "
          f"against ava's {profiles['ava']['matmul']:.0f} ms of matmuls alone")
    return profiles


if __name__ == "__main__":
    sys.exit(main())
