"""The `quantization:` section: training towards a low-precision format, and the held-out loss in it at the end."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ava.config.schema.base import Section


class QuantizationConfig(Section):
    """Quantization-aware training (or post-training quantization) of the Linear layers, with torchao.

    At the end of the run the trained weights are converted to the format and
    the held-out loss is measured again, beside the unquantized model's
    (summary.json `quantization`).
    """

    format: Literal["none", "nvfp4"] = Field(
        "none", description="Low-precision format the Linear layers' weights are trained towards and converted to. "
        "none: off. nvfp4: NVIDIA FP4 (E2M1 values in blocks of 16, each block with an FP8 E4M3 scale, and one "
        "fp32 scale per tensor); real FP4 matmuls need an NVIDIA Blackwell GPU (compute capability 10.0+, e.g. "
        "B200/GB200), elsewhere (CPU, H100) it is emulated.")
    method: Literal["qat", "ptq"] = Field(
        "qat", description="qat: quantization-aware training, every forward computes with the weights (and, with "
        "activations, the inputs) rounded to the format, gradients pass straight through; ptq: train in high "
        "precision and quantize only at the end.")
    activations: bool = Field(
        True, description="Also quantize each Linear layer's input to the format (W4A4, NVFP4's Blackwell "
        "inference path); false: weights only (W4A16).")
    per_tensor_scale: bool = Field(
        True, description="NVFP4's second-level fp32 scale per tensor, so the FP8 block scales use their whole "
        "range; false: block scales only.")

    @property
    def enabled(self) -> bool:
        return self.format != "none"
