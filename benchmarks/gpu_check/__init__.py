"""One prepared check of Ava on a lent GPU: `scripts/gpu_check.sh` runs `python -m benchmarks.gpu_check`.

Stages, in order, each under its own timeout and all within one budget:

  environment     GPU, driver, torch and CUDA versions, bf16/fp8 support, measured bf16/fp8 matmul rates
  wheels          Ava's dependencies the image lacks, installed from --wheels (each wheel checked first)
  imports         ava, deepspeed (and the accelerator it picked), torchao.float8, the rest of install_requires
  cuda_tests      the tests that behave differently with CUDA present
  deepspeed_ops   DeepSpeed's FusedAdam, JIT-built and stepped (the wheel is built with DS_BUILD_OPS=0)
  train_*         train.py for 30 steps: a 0.4B dense model and configs/gpu/base.yaml's MoE at 4 layers,
                  each in bf16 and fp8; tokens/s from metrics.jsonl, MFU against the datasheet peak

`--dry-run` runs the same stages on a CPU with stand-ins (a tiny model for 2
steps, one test file, the wheels checked but not installed, no JIT op), to
check the whole script in under a minute. Exit status 1 if a stage failed,
timed out or did not fit in --budget; the JSON is written either way.

Modules: `plan` (what runs; the FLOP and MFU arithmetic), `wheels` (which wheels
fit), `probes` (the checks that import torch, each its own process), `report`
(what a stage's outputs say), `check` (the stages, timeouts, JSON and log).
All but `probes` use the standard library only: they run before anything is installed.
"""
