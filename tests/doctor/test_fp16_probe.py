"""`ava doctor`'s fp16 verdict is DeepSpeed's own answer, confirmed by an fp16 step; the config check points at it."""

from __future__ import annotations

import pytest
import torch
from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

from ava.config import ConfigError, ConfigFiles, WorldSize, load_config
from ava.doctor.environment import _precisions
from ava.doctor.fp16_probe import fp16_step, probe_fp16
from tests.conftest import REPO


def test_fp16_verdict_agrees_with_deepspeeds_is_fp16_supported():
    answer = CPU_Accelerator().is_fp16_supported()
    verdict = _precisions("cpu")["fp16"]
    assert verdict.startswith("yes: " if answer else "no: "), verdict
    assert f"DeepSpeed's CPU_Accelerator.is_fp16_supported() returned {answer!r}" in verdict
    assert probe_fp16("cpu").supported == bool(answer)


def test_a_cpu_deepspeed_trains_fp16_on_is_reported_yes(monkeypatch):
    # The old verdict was a fixed "no: ... needs AMX-FP16", whatever DeepSpeed said.
    monkeypatch.setattr(CPU_Accelerator, "is_fp16_supported", lambda self: True)
    assert _precisions("cpu")["fp16"] == ("yes: DeepSpeed's CPU_Accelerator.is_fp16_supported() returned True and "
                                          "an fp16 matmul and its backward on cpu ran")


def test_deepspeed_refusing_fp16_is_no_even_where_torch_computes_it(monkeypatch):
    monkeypatch.setattr(CPU_Accelerator, "is_fp16_supported", lambda self: None)  # its answer without fp16 kernels
    verdict = probe_fp16("cpu").verdict()
    assert verdict.startswith("no: DeepSpeed's CPU_Accelerator.is_fp16_supported() returned None")
    assert "so deepspeed.initialize refuses fp16 although an fp16 matmul and its backward on cpu runs" in verdict


def test_deepspeed_saying_yes_on_a_device_whose_fp16_step_fails_is_no(monkeypatch):
    monkeypatch.setattr(CPU_Accelerator, "is_fp16_supported", lambda self: True)

    def no_half_kernel(self, other):
        raise RuntimeError('"addmm_impl_cpu_" not implemented for \'Half\'')

    monkeypatch.setattr(torch.Tensor, "__matmul__", no_half_kernel)
    probe = probe_fp16("cpu")
    assert not probe.supported
    assert probe.verdict() == ("no: DeepSpeed's CPU_Accelerator.is_fp16_supported() returned True, but an fp16 "
                               "matmul and its backward on cpu failed: RuntimeError: \"addmm_impl_cpu_\" not "
                               "implemented for 'Half'")


def test_the_fp16_step_runs_on_this_cpu():
    assert fp16_step("cpu") is None


def test_fp16_refused_by_cpu_hardware_names_the_declaration_and_the_doctor_probe(monkeypatch):
    monkeypatch.chdir(REPO)
    files = ConfigFiles("configs/gpu/tiny.yaml", hardware_config="configs/hardware/cpu.yaml")
    with pytest.raises(ConfigError) as refused:
        load_config(files, ["--mixed_precision", "fp16"], world=WorldSize(1, "test"))
    message = str(refused.value)
    assert "hardware.fp16 is false (configs/hardware/cpu.yaml:6)" in message
    assert "where `ava doctor` reports 'precision fp16: yes' on the training machine, set hardware.fp16: true" in message
    declared = load_config(files, ["--mixed_precision", "fp16", "--hardware.fp16", "true"], world=WorldSize(1, "test"))
    assert declared.config.training.mixed_precision == "fp16"
