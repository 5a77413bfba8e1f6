"""`ava config ...` and train.py do what they promise, through real subprocesses."""

from __future__ import annotations

import json
import subprocess
import sys

from ava.config import ConfigFiles, WorldSize, load_config
from tests.conftest import REPO

STACK = ["--config", "configs/gpu/base.yaml", "--hardware_config", "configs/hardware/h100_80gb.yaml",
         "--distributed_config", "configs/distributed/deepspeed_zero2.yaml"]


def ava(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ava", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=300, env=env)


def test_show_prints_yaml_that_loads_back_to_the_same_config(tmp_path):
    out = ava("config", "show", *STACK, "--batch_size", "16")
    assert out.returncode == 0, out.stderr
    dumped = tmp_path / "resolved.yaml"
    dumped.write_text(out.stdout)
    original = load_config(ConfigFiles(*[STACK[i] for i in (1, 3, 5)]), ["--batch_size", "16"], WorldSize(1, "t"))
    again = load_config(ConfigFiles(str(dumped)), world=WorldSize(1, "t"))
    assert again.config == original.config


def test_show_explain_annotates_origins():
    out = ava("config", "show", "--explain", *STACK, "--batch_size", "16")
    lines = out.stdout.splitlines()
    assert any("hidden_size: 1536" in ln and "configs/hardware/h100_80gb.yaml:" in ln for ln in lines)
    assert any("batch_size: 16" in ln and "command line (--batch_size 16)" in ln for ln in lines)
    assert any("gradient_accumulation_steps: 4" in ln and "derived" in ln for ln in lines)
    assert any("num_layers" not in ln and "# default" in ln for ln in lines)


def test_explain_shows_the_whole_override_chain():
    out = ava("config", "explain", "training.batch_size", *STACK, "--batch_size", "16")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "training.batch_size = 16" in text and "from:        command line (--batch_size 16)" in text
    order = [text.index(s) for s in ("configs/gpu/base.yaml:", "configs/hardware/h100_80gb.yaml:",
                                     "configs/distributed/deepspeed_zero2.yaml:", "command line (--batch_size 16)  ")]
    assert order == sorted(order)
    assert "as deepspeed.micro_batch_size" in text


def test_deepspeed_prints_the_generated_json():
    out = ava("config", "deepspeed", *STACK, "--num_gpus", "4")
    ds = json.loads(out.stdout)
    assert ds["train_batch_size"] == 64 and ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 4 and ds["zero_optimization"]["stage"] == 2


def test_diff_lists_only_changed_keys_with_origins():
    out = ava("config", "diff", "configs/gpu/tiny.yaml", "configs/gpu/small.yaml")
    assert out.returncode == 0, out.stderr
    assert "model.hidden_size" in out.stdout and "256 [configs/gpu/tiny.yaml:" in out.stdout
    assert "model.initializer_range" not in out.stdout  # equal in both
    same = ava("config", "diff", "configs/gpu/tiny.yaml", "configs/gpu/tiny.yaml")
    assert "no differences" in same.stdout


def test_schema_is_a_json_schema_that_accepts_shipped_configs_and_rejects_typos():
    import jsonschema

    from ava.config.yaml_loader import load_yaml_file

    schema = json.loads(ava("config", "schema").stdout)
    validator = jsonschema.Draft202012Validator(schema)
    for path in sorted((REPO / "configs").glob("*/*.yaml")):
        data = load_yaml_file(path).data
        assert not list(validator.iter_errors(data)), path
    assert list(validator.iter_errors({"model": {"hiden_size": 3}}))


def test_train_py_dry_run_validates_and_prints_the_resolved_config():
    out = subprocess.run([sys.executable, "train.py", "--config", "configs/gpu/tiny.yaml", "--hardware_config",
                          "configs/hardware/cpu.yaml", "--max_steps", "100", "--local_rank=0", "--dry_run"],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "max_steps: 100" in out.stdout and "config OK" in out.stdout
    assert '"train_micro_batch_size_per_gpu": 8' in out.stdout


def test_world_size_from_the_launcher_environment_shapes_the_batch():
    import os

    env = dict(os.environ, WORLD_SIZE="2")
    out = ava("config", "deepspeed", "--config", "configs/gpu/tiny.yaml", "--distributed_config",
              "configs/distributed/deepspeed_zero1.yaml", env=env)
    ds = json.loads(out.stdout)
    # deepspeed_zero1.yaml: global 32 at micro 4 (so that 8 GPUs can split it too), accumulation 4 on 2 ranks
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (32, 4, 4)
