"""scripts/gpu_check.sh, the prepared GPU check: its dry run works end to end here, and its arithmetic is right.

The dry run is the same script with CPU stand-ins (a tiny model, one test
file, the wheels checked but not installed); it is what keeps the GPU check
from rotting between the rare sessions that are lent a GPU. Its numbers mean
nothing and are not judged, only that they are there and consistent.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.gpu_check.plan import (
    ModelDims,
    datasheet_peak,
    make_plan,
    mfu,
    stage_names,
    train_args,
    training_flops_per_token,
)
from benchmarks.gpu_check.wheels import choose_wheels, wheel_tags
from tests.conftest import REPO

SCRIPT = REPO / "scripts" / "gpu_check.sh"
STAGES = ["environment", "wheels", "imports", "cuda_tests", "deepspeed_ops",
          "train_dense_bf16", "train_dense_fp8", "train_moe_bf16", "train_moe_fp8"]


def test_the_script_is_valid_bash():
    done = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr


def test_a_malformed_python_version_is_a_usage_error_before_any_download():
    done = subprocess.run(["bash", str(SCRIPT), "--fetch-wheels", "--python-version", "312"],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "not of the form 3.N" in done.stderr


@pytest.mark.slow
def test_dry_run_runs_every_stage_and_writes_the_json(tmp_path: Path):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO)}
    for var in ("OUT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    done = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--json", str(out), "--wheels", str(tmp_path / "none")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert out.with_suffix(".log").exists() and "=== gpu_check (dry run" in done.stdout
    assert report["mode"] == "dry-run" and report["finished"] and report["ok"]
    assert report["stage_names"] == STAGES and [s["name"] for s in report["stages"]] == STAGES
    stages = {s["name"]: s for s in report["stages"]}
    for s in report["stages"]:
        assert {"status", "seconds", "timeout_s"} <= set(s) and s["seconds"] >= 0
        assert s["status"] == ("skipped" if s["name"] == "deepspeed_ops" else "pass"), s
    assert "JIT" in stages["deepspeed_ops"]["reason"]

    env_details = stages["environment"]["details"]
    assert env_details["torch"] and env_details["cuda_available"] is False and env_details["matmul_bf16_flops"] > 0
    assert report["peak"]["bf16_flops"] == env_details["matmul_bf16_flops"]  # no datasheet entry for a CPU

    wheels = stages["wheels"]["details"]  # no wheel folder: the stand-ins, one fitting, one not
    assert wheels["standins"] and [Path(p).name for p in wheels["install"]] == ["standin-1.0-py3-none-any.whl"]
    assert wheels["unfit"] == ["standin_ext-1.0-cp27-cp27mu-linux_armv6l.whl"] and wheels["missing"] == []
    assert "--python-version" in stages["wheels"]["error"]  # the message says how to fetch matching wheels
    assert {"--no-index", "--no-deps", "--target", "--find-links"} <= set(wheels["would_run"])

    imports = stages["imports"]["details"]
    assert imports["deepspeed_accelerator"] == "cpu" and imports["torchao_float8"] is True
    assert all(imports["modules"][d]["ok"] for d in ("torch", "deepspeed", "pydantic", "torchao", "ava"))

    tests = stages["cuda_tests"]["details"]
    assert tests["passed"] >= 1 and tests["failed"] == 0

    for name in STAGES[5:]:
        d = stages[name]["details"]
        assert d["completed"] and d["checks_passed"] and d["steps"] == report["steps"] == 2
        assert d["precision_report"]["precision"] == d["precision"] == name.rsplit("_", 1)[1]
        assert d["tokens_per_s"] > 0 and math.isfinite(d["tokens_per_s"]) and len(d["tokens_per_s_windows"]) == 2
        # Ava's own FLOP count (logged) agrees with the hand formula, experts and router included.
        assert d["flops_ratio_ava_to_formula"] == pytest.approx(1.0, rel=1e-3)
        assert d["mfu_bf16_peak"] == pytest.approx(d["tokens_per_s"] * d["flops_per_token_ava"] / report["peak"]["bf16_flops"])
        assert d["mfu_bf16_peak"] > 0 and math.isfinite(d["mfu_bf16_peak"])
        assert d["step_seconds"] == pytest.approx(d["tokens_per_step"] / d["tokens_per_s"])
        assert not (tmp_path / name / "checkpoints").exists()


def test_stages_that_do_not_fit_the_budget_are_not_run_and_fail_the_check(tmp_path: Path):
    out = tmp_path / "gpu_check.json"
    done = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--budget", "10", "--json", str(out)], cwd=REPO,
                          env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=120)
    report = json.loads(out.read_text())
    assert done.returncode == 1 and report["finished"] and not report["ok"]
    assert [(s["name"], s["status"]) for s in report["stages"]] == [(name, "not_run") for name in STAGES]
    assert "out of budget" in report["stages"][0]["reason"]


def test_mfu_arithmetic_matches_a_hand_computation():
    # The GPU check's dense model: 24 layers, hidden 1024, SwiGLU 4096, vocab 65,536 (untied), seq 2048.
    # Per layer q,k,v,o 4 x 1024^2 = 4,194,304 and the FFN 3 x 1024 x 4096 = 12,582,912: 16,777,216;
    # x 24 = 402,653,184, + output head 1024 x 65,536 = 67,108,864 -> 469,762,048 matmul parameters.
    # 6 x that = 2,818,572,288, + attention 12 x 24 x 2048 x 1024 = 603,979,776 -> 3,422,552,064 FLOPs per token
    # (`train.py --dry_run` prints 3,422.6 MFLOP per training token for this model).
    dense = ModelDims(layers=24, hidden=1024, heads=16, ffn=4096, vocab=65536, seq=2048, batch=8)
    assert training_flops_per_token(dense) == 3_422_552_064
    # base.yaml's MoE at 4 layers: attention 4 x 768^2 = 2,359,296, two of 16 experts 2 x 3 x 768 x 3072 =
    # 14,155,776, router 768 x 16 = 12,288 -> 16,527,360 per layer, x 4 = 66,109,440, + head 768 x 65,536 =
    # 50,331,648 -> 116,441,088; x 6 = 698,646,528, + 12 x 4 x 2048 x 768 = 75,497,472 -> 774,144,000.
    moe = ModelDims(layers=4, hidden=768, heads=12, ffn=3072, vocab=65536, seq=2048, batch=8, experts=16, top_k=2)
    assert training_flops_per_token(moe) == 774_144_000
    # Grouped-query attention shrinks k and v: 4 kv heads of 64 -> 2 x 1024^2 + 2 x 1024 x 256 per layer.
    gqa = training_flops_per_token(dense, kv_heads=4)
    assert training_flops_per_token(dense) - gqa == 6 * 24 * 2 * 1024 * (1024 - 256)
    # 100,000 tokens/s of the dense model on an H100 SXM (989.4 TFLOP/s bf16 dense): 3.4226e14 / 9.894e14.
    assert mfu(100_000, 3_422_552_064, 989.4e12) == pytest.approx(0.345922, abs=1e-6)
    assert mfu(100_000, 3_422_552_064, None) is None


def test_the_peak_is_the_datasheet_value_for_the_gpu_name():
    assert datasheet_peak("NVIDIA H100 80GB HBM3") == {"bf16_flops": 989.4e12, "fp8_flops": 1978.9e12,
                                                       "source": "H100/H200 SXM datasheet, dense"}
    assert datasheet_peak("NVIDIA H200")["bf16_flops"] == 989.4e12
    assert datasheet_peak("NVIDIA H100 PCIe")["bf16_flops"] == 756e12
    assert datasheet_peak("NVIDIA GeForce RTX 4090") is None and datasheet_peak(None) is None


def test_wheels_are_chosen_as_pip_would_and_misfits_are_named():
    supported = ["cp312-cp312-manylinux_2_17_x86_64", "cp310-abi3-manylinux_2_28_x86_64", "py312-none-any",
                 "py311-none-any", "py3-none-any"]
    files = [Path(n) for n in (
        "multiprocess-0.70.19-py311-none-any.whl", "multiprocess-0.70.19-py312-none-any.whl",
        "pydantic_core-2.46.4-cp312-cp312-manylinux_2_17_x86_64.manylinux2014_x86_64.whl",
        "pydantic_core-2.46.4-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl",
        "torchao-0.18.0-cp310-abi3-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl",
        "torch-2.11.0-cp312-cp312-manylinux_2_28_x86_64.whl", "hjson-3.1.0-py3-none-any.whl")]
    choice = choose_wheels(files, supported)
    assert [Path(p).name for p in choice["install"]] == [
        "hjson-3.1.0-py3-none-any.whl", "multiprocess-0.70.19-py312-none-any.whl",
        "pydantic_core-2.46.4-cp312-cp312-manylinux_2_17_x86_64.manylinux2014_x86_64.whl",
        "torchao-0.18.0-cp310-abi3-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl"]
    assert choice["unfit"] == ["pydantic_core-2.46.4-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl"]
    assert any("torch comes with the image" in p for p in choice["problems"])
    two = choose_wheels([Path("hjson-3.0.0-py3-none-any.whl"), Path("hjson-3.1.0-py3-none-any.whl")], supported)
    assert any("two versions of hjson" in p for p in two["problems"])
    assert wheel_tags("Typing_Extensions-4.16.0-py3-none-any.whl")[:2] == ("typing-extensions", "4.16.0")


def test_both_modes_plan_the_same_stages_with_the_gpu_models_at_full_size():
    assert stage_names(make_plan(dry_run=True)) == stage_names(make_plan(dry_run=False)) == STAGES
    gpu = {t.name: t for t in make_plan(dry_run=False).trains}
    assert gpu["train_dense_bf16"].dims.layers == 24 and gpu["train_moe_fp8"].dims.experts == 16
    assert gpu["train_moe_bf16"].dims.layers == 4 and "configs/gpu/base.yaml" in gpu["train_moe_bf16"].base


def test_the_gpu_runs_are_valid_configs_whose_flops_match_avas_count():
    """The GPU stages' train.py arguments pass Ava's validation here, and Ava counts the FLOPs the MFU uses.

    The models are built on the meta device: no memory, no time, the same parameters.
    """
    torch = pytest.importorskip("torch")
    from ava.cli.args import add_stack_arguments, new_parser, resolve_stack
    from ava.model import AvaForCausalLM
    from ava.model.summary import summarise_model

    plan = make_plan(dry_run=False)
    for spec in plan.trains:
        parser = new_parser("train.py", "")
        add_stack_arguments(parser, require_config=True)
        ns, extras = parser.parse_known_args(train_args(spec, plan))
        config = resolve_stack(ns, extras).config
        assert config.training.mixed_precision == spec.precision and config.data.max_length == spec.dims.seq
        with torch.device("meta"):
            model = AvaForCausalLM(config.model)
        assert summarise_model(model, spec.dims.seq).training_flops_per_token == training_flops_per_token(spec.dims)
