"""The checks that need torch, each run as its own process by a stage: `python -m benchmarks.gpu_check.probes NAME`.

Each prints its result as one JSON line after RESULT_PREFIX; whatever else it prints goes to the stage's log.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from typing import Any

from benchmarks.gpu_check.wheels import IMPORT_NAMES, installed, required_distributions

RESULT_PREFIX = "GPU_CHECK_RESULT "  # a probe's last line: this prefix, then its JSON


def _emit(result: dict[str, Any]) -> None:
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def _matmul_rate(torch: Any, device: str, n: int, repeats: int, fp8: bool) -> float:
    """FLOP/s of n x n x n products on random data (zeros run faster than real data on these GPUs)."""
    dtype = torch.bfloat16
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    if fp8:
        one = torch.ones((), device=device, dtype=torch.float32)
        a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn).t()  # _scaled_mm wants b column-major

        def op() -> Any:
            return torch._scaled_mm(a8, b8, scale_a=one, scale_b=one, out_dtype=dtype)
    else:
        def op() -> Any:
            return a @ b
    for _ in range(3):
        op()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        op()
    if device == "cuda":
        torch.cuda.synchronize()
    return 2.0 * n**3 * repeats / (time.perf_counter() - start)


def probe_environment(dry_run: bool) -> None:
    import platform

    import torch

    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "torch_cuda": torch.version.cuda, "cpu_count": os.cpu_count(),
                            "cuda_available": torch.cuda.is_available(), "platform": platform.platform()}
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    info["cudnn"] = cudnn
    device = "cpu"
    if torch.cuda.is_available():
        device = "cuda"
        props = torch.cuda.get_device_properties(0)
        info.update(gpu_name=props.name, gpu_count=torch.cuda.device_count(),
                    capability=f"{props.major}.{props.minor}", gpu_memory_gb=round(props.total_memory / 2**30, 1),
                    multiprocessors=props.multi_processor_count, bf16=torch.cuda.is_bf16_supported(),
                    fp8=(props.major, props.minor) >= (8, 9))
    else:
        info.update(gpu_name=None, gpu_count=0, capability=None, bf16=True, fp8=False)
    for tool, args in (("nvidia-smi", ["--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                                       "--format=csv,noheader"]), ("nvcc", ["--version"])):
        if shutil.which(tool):
            try:
                out = subprocess.run([tool, *args], capture_output=True, text=True, timeout=30)
                info[tool.replace("-", "_")] = (out.stdout.strip().splitlines() or [""])[-1]
            except (OSError, subprocess.SubprocessError) as exc:
                info[tool.replace("-", "_")] = f"{type(exc).__name__}: {exc}"
    n, repeats = (8192, 20) if device == "cuda" else (256, 3)
    info["matmul_bf16_flops"] = _matmul_rate(torch, device, n, repeats, fp8=False)
    if info["fp8"]:
        try:  # torch._scaled_mm is private: its signature has changed between releases
            info["matmul_fp8_flops"] = _matmul_rate(torch, device, n, repeats, fp8=True)
        except Exception as exc:
            info["matmul_fp8_error"] = f"{type(exc).__name__}: {exc}"[:500]
    _emit(info)


def probe_imports(dry_run: bool) -> None:
    modules: dict[str, Any] = {}
    for dist in [*required_distributions(), "ava"]:
        module = IMPORT_NAMES.get(dist, dist)
        try:
            __import__(module)
            modules[dist] = {"ok": True, "version": installed(dist) or getattr(sys.modules[module], "__version__", None)}
        except Exception as exc:  # a broken install raises more than ImportError
            modules[dist] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:500]}
    result: dict[str, Any] = {"modules": modules}
    try:
        import torchao.float8  # noqa: F401  (what fp8 training needs from torchao)
        result["torchao_float8"] = True
    except Exception as exc:
        result["torchao_float8"] = f"{type(exc).__name__}: {exc}"[:500]
    try:
        from deepspeed.accelerator import get_accelerator
        result["deepspeed_accelerator"] = get_accelerator()._name
    except Exception as exc:
        result["deepspeed_accelerator"] = None
        result["deepspeed_accelerator_error"] = f"{type(exc).__name__}: {exc}"[:500]
    _emit(result)


def probe_fused_adam(dry_run: bool) -> None:
    import torch
    from deepspeed.ops.adam import FusedAdam

    start = time.perf_counter()
    p = torch.nn.Parameter(torch.randn(4096, device="cuda"))
    opt = FusedAdam([p], lr=1e-3)  # JIT-builds the op on first use (nvcc, ninja)
    built = time.perf_counter() - start
    before = p.detach().clone()
    p.grad = torch.randn_like(p)
    opt.step()
    torch.cuda.synchronize()
    _emit({"build_seconds": built, "step_changed_weights": not torch.equal(before, p.detach())})


def probe_memory_estimate(dry_run: bool) -> None:
    """Ava's memory estimate per device for each training stage's run (`ava.model.memory_estimate`).

    The stage compares it with the run's torch.cuda.max_memory_allocated (`report.memory_comparison`).
    """
    from ava.cli.args import add_stack_arguments, new_parser, stack_from
    from ava.config import load_config
    from ava.model.memory_fit import check_run_memory
    from benchmarks.gpu_check.plan import make_plan, train_args

    plan = make_plan(dry_run)
    result: dict[str, Any] = {}
    for spec in plan.trains:
        parser = new_parser("train.py", "")
        add_stack_arguments(parser)
        ns, extras = parser.parse_known_args(train_args(spec, plan))
        stack = stack_from(ns, extras)
        cfg = load_config(stack.files, stack.overrides, stack.world).config
        e = check_run_memory(cfg.model, cfg.training, cfg.deepspeed, cfg.data.max_length, stack.world.size,
                             None).estimate
        result[spec.name] = e.as_dict()
    _emit(result)


PROBES = {"environment": probe_environment, "imports": probe_imports, "deepspeed_ops": probe_fused_adam,
          "memory_estimate": probe_memory_estimate}


if __name__ == "__main__":
    PROBES[sys.argv[1]]("--dry-run" in sys.argv[2:])
