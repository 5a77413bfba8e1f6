"""Every bad RLHF input is one clear message and exit status 2, before any rank starts or any file is touched."""

from __future__ import annotations

import pytest
import torch

from ava.cli.main import rlhf_entry
from ava.config.schema.model import ModelConfig
from ava.model import AvaForCausalLM
from ava.model.store import save_model_dir
from ava.rlhf.models import AvaValueModel, save_value_model
from tests.conftest import REPO

SMALL = ModelConfig(hidden_size=32, num_layers=1, num_attention_heads=4, intermediate_size=32, vocab_size=257,
                    max_position_embeddings=64, num_experts=0)
STACK = ["--config", str(REPO / "configs/gpu/tiny.yaml"), "--hardware_config", str(REPO / "configs/hardware/cpu.yaml"),
         "--rlhf_config", str(REPO / "configs/rlhf/test_cpu.yaml"), "--hidden_size", "32", "--num_layers", "1",
         "--intermediate_size", "32", "--vocab_size", "257", "--max_position_embeddings", "64", "--max_length", "64",
         "--num_experts", "0", "--num_attention_heads", "4"]


def _fails(capsys, tmp_path, *args: str) -> str:
    status = rlhf_entry([*STACK, "--output_dir", str(tmp_path / "out"), *args])
    err = capsys.readouterr().err
    assert status == 2, err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()  # nothing was started, so nothing was written
    return err


def test_without_an_rlhf_config_the_command_says_which_flag_is_missing(capsys):
    assert rlhf_entry(["--config", str(REPO / "configs/gpu/tiny.yaml")]) == 2
    assert "--rlhf_config is required" in capsys.readouterr().err


def test_a_missing_policy_path_is_named(capsys, tmp_path):
    err = _fails(capsys, tmp_path, "--rlhf.policy_path", str(tmp_path / "nowhere"))
    assert "rlhf.policy_path" in err and "does not exist" in err


def test_a_reward_model_given_as_the_policy_is_refused(capsys, tmp_path):
    save_value_model(AvaValueModel(SMALL).state_dict(), SMALL, tmp_path / "rm")
    err = _fails(capsys, tmp_path, "--rlhf.policy_path", str(tmp_path / "rm"))
    assert "holds a reward model" in err and "not a policy" in err


def test_a_policy_given_as_the_reward_model_is_refused(capsys, tmp_path):
    torch.manual_seed(0)
    save_model_dir(AvaForCausalLM(SMALL), tmp_path / "policy")
    err = _fails(capsys, tmp_path, "--rlhf.reward_model_path", str(tmp_path / "policy"))
    assert "rlhf.reward_model_path" in err and "not a reward model" in err


def test_a_corrupt_prompts_file_names_the_line(capsys, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "d:123456="}\n{"prompt": \n')
    err = _fails(capsys, tmp_path, "--rlhf.ppo.prompts_path", str(prompts))
    assert f"rlhf.ppo.prompts_path: {prompts} line 2 is not valid JSON" in err


def test_a_preference_file_missing_a_field_names_the_line_and_field(capsys, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"prompt": "a", "chosen": "b"}\n')
    err = _fails(capsys, tmp_path, "--rlhf.stages", "[dpo]", "--rlhf.grpo.init_from", "null",
                 "--rlhf.ppo.init_from", "null", "--rlhf.dpo.data_path", str(pairs))
    assert "line 1 has no text field(s) rejected" in err


def test_a_reward_function_that_cannot_be_imported_is_named(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    err = _fails(capsys, tmp_path, "--rlhf.reward_function", "no_such_module:score")
    assert "rlhf.reward_function 'no_such_module:score'" in err and "not found" in err


def test_responses_that_cannot_fit_the_context_are_refused_before_training(capsys, tmp_path):
    err = _fails(capsys, tmp_path, "--rlhf.generation.max_new_tokens", "60")
    assert "rlhf.generation.max_new_tokens = 60" in err and "max_position_embeddings = 64" in err


def test_a_tokenizer_larger_than_the_model_is_refused(capsys, tmp_path):
    err = _fails(capsys, tmp_path, "--vocab_size", "200")
    assert "tokenizer vocabulary 257 exceeds model.vocab_size = 200" in err


def test_an_existing_run_is_never_overwritten(capsys, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "summary.json").write_text("keep me")
    assert rlhf_entry([*STACK, "--output_dir", str(out)]) == 2
    assert "already holds files" in capsys.readouterr().err
    assert (out / "summary.json").read_text() == "keep me"


@pytest.mark.parametrize("args", [["--resume"], ["--resume", "--output_dir", "/nonexistent/run"]])
def test_resume_needs_an_existing_output_dir(capsys, args):
    assert rlhf_entry([*STACK, *args]) == 2
    assert "--resume needs the --output_dir" in capsys.readouterr().err
