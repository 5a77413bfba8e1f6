"""Every shipped combination produces a DeepSpeed JSON that DeepSpeed's own parser accepts."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest

from ava.config import ConfigFiles, WorldSize, build_deepspeed_config, load_config
from tests.conftest import REPO

CONFIGS = REPO / "configs"
WORKER = Path(__file__).with_name("ds_parse_worker.py")


def _combinations():
    gpus = sorted(CONFIGS.glob("gpu/*.yaml"))
    hardware = [None, *sorted(CONFIGS.glob("hardware/*.yaml"))]
    distributed = [None, *sorted(CONFIGS.glob("distributed/*.yaml"))]
    return list(itertools.product(gpus, hardware, distributed))


def _no_auto(node) -> bool:
    if isinstance(node, dict):
        return all(_no_auto(v) for v in node.values())
    if isinstance(node, list):
        return all(_no_auto(v) for v in node)
    return node != "auto"


@pytest.mark.slow
def test_every_shipped_combination_passes_deepspeeds_parser():
    cases, expected = [], {}
    for (g, h, d), world in itertools.product(_combinations(), (1, 2)):
        files = ConfigFiles(str(g), str(h) if h else None, str(d) if d else None)
        resolved = load_config(files, world=WorldSize(world, "test"))
        ds = build_deepspeed_config(resolved.config)
        assert _no_auto(ds)
        label = f"{g.name}+{h.name if h else '-'}+{d.name if d else '-'}@{world}"
        cases.append({"label": label, "world": world, "config": ds})
        expected[label] = ds
    proc = subprocess.run([sys.executable, str(WORKER)], input=json.dumps(cases), capture_output=True,
                          text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(results) == len(cases)
    failures = [r for r in results if not r["ok"]]
    assert not failures, failures[:5]
    for r in results:
        ds = expected[r["label"]]
        assert r["train_batch_size"] == ds["train_batch_size"]
        assert r["micro"] == ds["train_micro_batch_size_per_gpu"]
        assert r["accumulation"] == ds["gradient_accumulation_steps"]
        assert r["stage"] == ds["zero_optimization"]["stage"]
        assert r["bf16"] == ds["bf16"]["enabled"] and r["fp16"] == ds["fp16"]["enabled"]


@pytest.mark.slow
def test_deepspeeds_parser_rejects_an_inconsistent_batch_so_the_check_is_real():
    resolved = load_config(ConfigFiles(str(CONFIGS / "gpu/tiny.yaml")), world=WorldSize(1, "t"))
    ds = build_deepspeed_config(resolved.config)
    ds["train_batch_size"] += 1
    proc = subprocess.run([sys.executable, str(WORKER)], input=json.dumps([{"label": "bad", "world": 1, "config": ds}]),
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["ok"] is False and "batch" in result["error"]


def test_zero3_offload_and_precision_map_to_deepspeed_sections():
    files = ConfigFiles(str(CONFIGS / "gpu/base.yaml"), str(CONFIGS / "hardware/h100_80gb.yaml"),
                        str(CONFIGS / "distributed/deepspeed_zero3.yaml"))
    ds = build_deepspeed_config(load_config(files, world=WorldSize(8, "t")).config)
    z = ds["zero_optimization"]
    assert z["stage"] == 3 and z["offload_optimizer"]["device"] == "cpu" and z["offload_param"]["device"] == "cpu"
    assert z["stage3_max_live_parameters"] == 1_000_000_000
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False  # fp8 trains on bf16 master weights
    assert ds["optimizer"]["params"]["lr"] == 4e-5


def test_fp16_gets_dynamic_loss_scaling(write_yaml):
    path = write_yaml("c.yaml", "training:\n  mixed_precision: fp16\n")
    ds = build_deepspeed_config(load_config(ConfigFiles(path), world=WorldSize(1, "t")).config)
    assert ds["fp16"]["enabled"] is True and ds["fp16"]["loss_scale"] == 0
