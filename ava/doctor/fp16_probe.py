"""Whether fp16 trains here: DeepSpeed's own answer, confirmed by an fp16 matmul and its backward on the device.

`deepspeed.initialize` refuses an fp16 config ("Type fp16 is not supported on your device") when its
accelerator's `is_fp16_supported()` is false, whatever torch can compute. On CPUs DeepSpeed answers with
oneDNN's float16 support (`torch.ops.mkldnn._is_mkldnn_fp16_supported()`: CPUs with AVX512-FP16, such as
Xeon Sapphire Rapids and newer, AMX-FP16 ones included); on GPUs, with the compute capability. So the
verdict is DeepSpeed's answer, asked of the accelerator a run would use, and a tiny fp16 step shows that
the device really computes in it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Fp16Probe:
    accelerator: str  # the DeepSpeed accelerator class asked
    answer: Any  # what its is_fp16_supported() returned (None on CPUs without fp16 kernels)
    why_not: str  # DeepSpeed's reason for a falsy answer, when it can be told
    device: str
    step_error: str | None  # None: the fp16 matmul and its backward ran and agree with fp32

    @property
    def supported(self) -> bool:
        return bool(self.answer) and self.step_error is None

    def verdict(self) -> str:
        """The doctor's row: yes or no, and what was probed."""
        asked = f"DeepSpeed's {self.accelerator}.is_fp16_supported() returned {self.answer!r}"
        step = f"an fp16 matmul and its backward on {self.device}"
        if self.supported:
            return f"yes: {asked} and {step} ran"
        if self.answer:
            return f"no: {asked}, but {step} failed: {self.step_error}"
        why = f" ({self.why_not})" if self.why_not else ""
        runs = f" although {step} runs" if self.step_error is None else ""
        return f"no: {asked}{why}, so deepspeed.initialize refuses fp16{runs}; use bf16"


def fp16_step(device: str) -> str | None:
    """An fp16 matmul and its backward on `device`; None when they run and agree with fp32, else what went wrong."""
    import torch

    try:
        generator = torch.Generator().manual_seed(0)
        a32, b32 = torch.randn(16, 32, generator=generator), torch.randn(32, 8, generator=generator)
        a = a32.to(device, torch.float16).requires_grad_()
        b = b32.to(device, torch.float16).requires_grad_()
        out = a @ b
        out.float().square().sum().backward()
        reference = a32.half().float() @ b32.half().float()
        error = (out.float().cpu() - reference).abs().max().item() / reference.abs().max().item()
    except Exception as exc:  # noqa: BLE001 -- the probe reports any failure of the device as its verdict
        return f"{type(exc).__name__}: {exc}"
    if out.dtype != torch.float16 or a.grad is None or a.grad.dtype != torch.float16:
        return "the result or its gradient is not float16"
    if not (torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()):  # type: ignore[arg-type]
        return "the gradient is not finite"
    if error > 1e-2:
        return f"the result differs from fp32 by {error:.1e} (relative)"
    return None


def _accelerator(name: str) -> Any:
    """The DeepSpeed accelerator a run on `name` (cpu or cuda) gets, made directly: DS_ACCELERATOR need not be set."""
    if name == "cuda":
        from deepspeed.accelerator.cuda_accelerator import CUDA_Accelerator

        return CUDA_Accelerator()
    from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

    return CPU_Accelerator()


def _why_not(name: str) -> str:
    import torch

    if name == "cuda":
        major, minor = torch.cuda.get_device_capability()
        return f"compute capability sm_{major}{minor}; DeepSpeed needs 7.0 or newer"
    try:
        kernels = torch.ops.mkldnn._is_mkldnn_fp16_supported()
    except Exception:  # noqa: BLE001 -- an older torch without the query
        return ""
    if kernels:
        return ""
    return "oneDNN has no fp16 kernels for this CPU: torch.ops.mkldnn._is_mkldnn_fp16_supported() is False"


def probe_fp16(name: str) -> Fp16Probe:
    """Ask DeepSpeed's accelerator for `name` whether fp16 is supported, and run an fp16 step on its device."""
    accelerator = _accelerator(name)
    answer = accelerator.is_fp16_supported()
    device = "cuda:0" if name == "cuda" else "cpu"
    return Fp16Probe(type(accelerator).__name__, answer, "" if answer else _why_not(name), device, fp16_step(device))
