"""`ava model summary | import-hf | export-hf` and the Ava model directory, end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from ava.config.schema.model import ModelConfig
from ava.errors import UserError
from ava.model import AvaForCausalLM
from ava.model.store import load_model_dir, save_model_dir
from ava.model.summary import summarise_config
from tests.conftest import REPO


def _ava(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ava", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


def _tiny() -> ModelConfig:
    return ModelConfig(hidden_size=32, num_layers=2, num_attention_heads=4, intermediate_size=48, vocab_size=53,
                       max_position_embeddings=32, num_experts=4, num_experts_per_token=2)


def test_summary_json_matches_the_library_numbers():
    result = _ava("model", "summary", "--config", "configs/gpu/tiny.yaml", "--hardware_config",
                  "configs/hardware/cpu.yaml", "--json")
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    from ava.config.yaml_loader import load_yaml_file

    cfg = ModelConfig.model_validate(load_yaml_file(REPO / "configs/gpu/tiny.yaml").data["model"])
    expected = summarise_config(cfg, 128)
    assert shown["total_parameters"] == expected.total == 13_116_672
    assert shown["active_parameters_per_token"] == expected.active_per_token
    assert shown["training_flops_per_token"] == expected.training_flops_per_token


def test_summary_table_names_components_and_flops():
    result = _ava("model", "summary", "--config", "configs/gpu/small.yaml", "--seq_len", "256")
    assert result.returncode == 0, result.stderr
    for needle in ("total parameters", "active per token", "experts", "attention", "FLOPs per token at seq 256"):
        assert needle in result.stdout


def test_import_of_a_missing_directory_is_a_user_error_without_traceback(tmp_path):
    result = _ava("model", "import-hf", str(tmp_path / "nope"), "--out", str(tmp_path / "out"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "is not a directory" in result.stderr and "Fix:" in result.stderr
    assert not (tmp_path / "out").exists()


def test_cli_import_then_export_round_trips_through_transformers(tmp_path):
    transformers = pytest.importorskip("transformers", reason="dev dependency: pip install -e .[dev]")
    torch.manual_seed(0)
    hf = transformers.MixtralForCausalLM(transformers.MixtralConfig(
        vocab_size=53, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, num_local_experts=4, num_experts_per_tok=2)).eval()
    hf.save_pretrained(tmp_path / "hf")
    imported = _ava("model", "import-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ava"))
    assert imported.returncode == 0, imported.stderr
    exported = _ava("model", "export-hf", str(tmp_path / "ava"), "--out", str(tmp_path / "back"))
    assert exported.returncode == 0 and "as mixtral" in exported.stdout, exported.stderr
    back = transformers.MixtralForCausalLM.from_pretrained(tmp_path / "back").eval()
    ids = torch.randint(0, 53, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, hf(ids).logits, atol=1e-5, rtol=0)


def test_model_directory_round_trip_and_refusal_to_overwrite(tmp_path):
    model = AvaForCausalLM(_tiny()).eval()
    save_model_dir(model, tmp_path / "m")
    loaded = load_model_dir(tmp_path / "m").eval()
    ids = torch.randint(0, 53, (2, 8))
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    with pytest.raises(UserError, match="never overwrites"):
        save_model_dir(AvaForCausalLM(_tiny()), tmp_path / "m")


def test_truncated_weights_file_is_reported_as_corrupt(tmp_path):
    save_model_dir(AvaForCausalLM(_tiny()), tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(UserError, match="truncated or corrupt"):
        load_model_dir(tmp_path / "m")


def test_weights_from_another_config_are_refused_with_the_mismatches(tmp_path):
    save_model_dir(AvaForCausalLM(_tiny()), tmp_path / "m")
    config = (tmp_path / "m" / "ava_model.yaml").read_text().replace("intermediate_size: 48", "intermediate_size: 64")
    (tmp_path / "m" / "ava_model.yaml").write_text(config)
    with pytest.raises(UserError, match="shape mismatches"):
        load_model_dir(tmp_path / "m")
