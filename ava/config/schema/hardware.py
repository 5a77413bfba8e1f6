"""The `hardware:` section: what the machine can do, declared by the hardware config.

Precision checks compare the requested precision with these capabilities, so
a config meant for an H100 can be validated on a laptop.  With no hardware
config the accelerator is `auto` and the check waits for run time.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ava.config.schema.base import Section

# 1 PiB per device: a thousand times the largest accelerator or host memory sold.
MEMORY_GB_MAX = 2.0**20


class HardwareConfig(Section):
    """Capabilities of the target device."""

    name: str = Field("unspecified", description="Human-readable device name.")
    accelerator: Literal["auto", "cpu", "cuda"] = Field("auto", description="Device type.")
    memory_gb: float | None = Field(
        None, gt=0, le=MEMORY_GB_MAX,
        description="Memory per device in GiB: `ava config validate` refuses a run estimated not to "
        "fit it (--force accepts it), and dry runs and the run's start warn. null = no verdict.")
    bf16: bool = Field(True, description="The device computes in bfloat16.")
    fp16: bool = Field(True, description="The device trains in float16. On a CPU DeepSpeed allows fp16 only where "
                       "oneDNN has fp16 kernels (AVX512-FP16); `ava doctor` reports it for the machine it runs on.")
    fp8: bool = Field(False, description="The device has FP8 matrix units (Ada, Hopper, Blackwell).")
    keep_freed_host_memory: bool = Field(
        True, description="CPU training: keep memory a step frees for the next step instead of returning it to "
        "the kernel (glibc malloc thresholds). Up to 1.45x faster steps at large activations, for about 15% "
        "more resident memory; false gives the memory back.")
