"""The memory check and the preset notice, as the CLI shows them (in-process: `ava.cli.main.main`).

`ava config validate` refuses a stack estimated not to fit hardware.memory_gb
(exit 2, the largest term and the fixes) unless --force; dry runs and `ava
model summary` show the estimate; a hardware preset that changes model keys
says so; `--all` checks 1, 2, 4 and 8 ranks and reports memory as warnings.
"""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

from ava.cli.main import main
from tests.conftest import REPO

H100 = ["--config", "configs/gpu/base.yaml", "--hardware_config", "configs/hardware/h100_80gb.yaml", "--batch_size", "32"]


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)


def test_the_guides_h100_example_does_not_fit_and_validate_names_the_largest_term_and_fixes(capsys):
    assert main(["config", "validate", *H100]) == 2
    err = capsys.readouterr().err
    assert "more than hardware.memory_gb = 80 GiB (configs/hardware/h100_80gb.yaml:5)" in err
    assert "the largest term is optimizer" in err
    for fix in ("deepspeed.cpu_offload: true", "ZeRO-3 over", "micro batch", "model.num_experts: ", "--force"):
        assert fix in err, fix
    assert "Traceback" not in err


def test_force_turns_the_memory_error_into_a_warning(capsys):
    assert main(["config", "validate", *H100, "--force"]) == 0
    out, err = capsys.readouterr()
    assert "valid: configs/gpu/base.yaml, configs/hardware/h100_80gb.yaml" in out
    assert "does NOT fit; largest term optimizer" in out
    assert "WARNING (--force): the run is estimated to need" in err


def test_a_tiny_model_fits_a_24gb_card(capsys):
    assert main(["config", "validate", "--config", "configs/gpu/tiny.yaml", "--hardware_config",
                 "configs/hardware/rtx4090_24gb.yaml"]) == 0
    out = capsys.readouterr().out
    assert "memory per device (estimate):" in out and "(configs/hardware/rtx4090_24gb.yaml:5): fits" in out


def test_dry_run_shows_the_estimate_and_warns_when_it_does_not_fit(capsys):
    from ava.cli import train_cmd

    assert train_cmd.main([*H100, "--dry_run"]) == 0
    out = capsys.readouterr().out
    assert "memory per device (estimate" in out
    for term in ("weights", "gradients", "optimizer", "activations", "logits", "buffers", "margin", "total"):
        assert f"\n  {term} " in out, term
    assert "of 80 GiB (configs/hardware/h100_80gb.yaml:5): does NOT fit" in out
    assert "WARNING: the run is estimated to need" in out
    assert "note: model shape from configs/hardware/h100_80gb.yaml, over configs/gpu/base.yaml: hidden_size " \
           "768 -> 1536, num_layers 16 -> 32" in out
    assert "(59.3B parameters; 1.95B with configs/gpu/base.yaml's own shape)" in out


def test_presets_that_change_the_model_say_so_in_summary_and_show(capsys):
    stack = ["--config", "configs/gpu/small.yaml", "--hardware_config", "configs/hardware/h100_80gb.yaml"]
    assert main(["model", "summary", *stack]) == 0
    out = capsys.readouterr().out
    assert "note: model shape from configs/hardware/h100_80gb.yaml, over configs/gpu/small.yaml: hidden_size 512 " \
           "-> 1536, num_layers 8 -> 32, num_attention_heads 8 -> 24" in out
    assert "memory per device (estimate" in out
    assert main(["config", "show", *stack]) == 0
    out, err = capsys.readouterr()
    assert "note: model shape from configs/hardware/h100_80gb.yaml, over configs/gpu/small.yaml" in err
    assert "model shape" not in out  # stdout stays the YAML
    # A preset that leaves the model alone says nothing.
    assert main(["config", "show", "--config", "configs/gpu/small.yaml", "--hardware_config",
                 "configs/hardware/rtx4090_24gb.yaml"]) == 0
    assert "model shape" not in capsys.readouterr().err


def _configs(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = tmp_path / "configs" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip("\n"))
    (tmp_path / "configs" / "gpu").mkdir(parents=True, exist_ok=True)
    return tmp_path / "configs"


def test_validate_all_checks_eight_ranks_by_default_and_the_zero1_preset_holds_there(tmp_path, capsys):
    root = _configs(tmp_path, {
        "gpu/tiny.yaml": (REPO / "configs/gpu/tiny.yaml").read_text(),
        "distributed/deepspeed_zero1.yaml": (REPO / "configs/distributed/deepspeed_zero1.yaml").read_text()})
    assert main(["config", "validate", "--all", "--configs_dir", str(root)]) == 0
    out = capsys.readouterr().out
    assert "8/8 shipped combinations valid (2 stacks x world sizes 1,2,4,8)" in out


def test_a_recipe_whose_fixed_batch_cannot_split_over_a_world_size_is_skipped_there(tmp_path, capsys):
    recipe = """
        model: {hidden_size: 64, num_layers: 1, num_attention_heads: 2, intermediate_size: 64, vocab_size: 256,
                num_experts: 1}
        training: {batch_size: 4, max_steps: 100, warmup_steps: 10, mixed_precision: fp32}
        deepspeed: {train_batch_size: 48}
        """
    root = _configs(tmp_path, {"recipes/r/fixed48.yaml": recipe})
    assert main(["config", "validate", "--all", "--configs_dir", str(root)]) == 0
    out = capsys.readouterr().out
    assert "SKIP  recipes/r/fixed48.yaml  (world size 8): not a world size this recipe is for" in out
    assert "3/3 shipped combinations valid (1 stacks x world sizes 1,2,4,8)" in out and "1 skipped" in out
    # ... but a recipe that fits no world size at all fails.
    (root / "recipes/r/fixed48.yaml").write_text(textwrap.dedent(recipe).replace("48", "47"))
    assert main(["config", "validate", "--all", "--configs_dir", str(root)]) == 2
    assert "FAIL  recipes/r/fixed48.yaml  (world size 1)" in capsys.readouterr().out


def test_validate_all_reports_memory_as_warnings_not_failures(tmp_path, capsys):
    root = _configs(tmp_path, {
        "gpu/tiny.yaml": (REPO / "configs/gpu/tiny.yaml").read_text(),
        "hardware/h100_80gb.yaml": (REPO / "configs/hardware/h100_80gb.yaml").read_text()})
    assert main(["config", "validate", "--all", "--configs_dir", str(root), "--world_sizes", "1,8"]) == 0
    out = capsys.readouterr().out
    assert "MEMORY  gpu/tiny.yaml + hardware/h100_80gb.yaml: estimated " in out
    assert " at 1, " in out and " at 8 rank(s) per device, over hardware.memory_gb 80 GiB" in out
    assert "1 stack(s) estimated not to fit their hardware.memory_gb at some world size: warnings, not failures" in out


def test_zero1_preset_splits_its_global_batch_over_the_launchers_world_size(capsys, monkeypatch):
    import json

    monkeypatch.setenv("WORLD_SIZE", "8")
    assert main(["config", "deepspeed", "--config", "configs/gpu/tiny.yaml", "--distributed_config",
                 "configs/distributed/deepspeed_zero1.yaml"]) == 0
    ds = json.loads(capsys.readouterr().out)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (32, 4, 1)
    assert os.environ["WORLD_SIZE"] == "8"
