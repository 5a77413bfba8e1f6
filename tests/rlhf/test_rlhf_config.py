"""The rlhf: section: shipped config, defaults, and every cross-key rule that stops a pipeline before it trains."""

from __future__ import annotations

import pytest

from ava.config import ConfigError, ConfigFiles, WorldSize, load_config
from ava.config.schema.rlhf import TaskName
from ava.rlhf.tasks import TASKS
from tests.conftest import REPO

C = REPO / "configs"


def _load(*overrides: str, world: int = 1):
    files = ConfigFiles(str(C / "gpu/tiny.yaml"), str(C / "hardware/cpu.yaml"), None, str(C / "rlhf/test_cpu.yaml"))
    return load_config(files, overrides, WorldSize(world, "test"))


def _problems(*overrides: str) -> str:
    with pytest.raises(ConfigError) as err:
        _load(*overrides)
    return err.value.render()


def test_the_shipped_cpu_pipeline_is_sft_then_ppo_and_grpo_from_the_sft_policy():
    r = _load().config.rlhf
    assert r is not None and r.stages == ["sft", "ppo", "grpo"]
    assert r.ppo.init_from == "sft" and r.grpo.init_from == "sft"
    assert r.task.demonstration_error_rate > 0  # imperfect demonstrations leave RL something to fix
    assert r.ppo.kl_estimator == "k3"


def test_the_schema_lists_exactly_the_built_in_tasks():
    assert set(TaskName.__args__) == set(TASKS)


def test_a_stage_listed_twice_is_refused():
    assert "stage 'ppo' is listed twice" in _problems("--rlhf.stages", "[sft, ppo, ppo]")


def test_init_from_must_name_an_earlier_policy_stage():
    text = _problems("--rlhf.stages", "[ppo, sft]", "--rlhf.ppo.init_from", "sft", "--rlhf.grpo.init_from", "null")
    assert "rlhf.ppo.init_from = 'sft': stage 'sft' does not run before 'ppo'" in text
    assert "list 'sft' before 'ppo'" in text
    assert "trains a reward model, not a policy" in _problems("--rlhf.stages", "[reward, ppo]",
                                                               "--rlhf.ppo.init_from", "reward")


def test_mini_batches_must_divide_the_rollout():
    assert "rlhf.ppo.mini_batch_size = 5: must divide rlhf.ppo.rollout_batch_size = 32" in _problems(
        "--rlhf.ppo.mini_batch_size", "5")
    text = _problems("--rlhf.grpo.prompts_per_step", "3", "--rlhf.grpo.num_generations", "3")
    assert "must divide prompts_per_step x num_generations = 9" in text


def test_the_adaptive_kl_controller_needs_a_target():
    assert "rlhf.ppo.kl_target" in _problems("--rlhf.ppo.kl_controller", "adaptive")
    assert _load("--rlhf.ppo.kl_controller", "adaptive", "--rlhf.ppo.kl_target", "4.0").config.rlhf.ppo.kl_target == 4


def test_a_reward_model_source_needs_a_reward_model():
    assert "no reward stage runs before ppo" in _problems("--rlhf.ppo.reward_source", "model")
    r = _load("--rlhf.stages", "[sft, reward, ppo]", "--rlhf.grpo.init_from", "null",
              "--rlhf.ppo.reward_source", "model").config.rlhf
    assert r.stages == ["sft", "reward", "ppo"]
    assert "rlhf.reward_function is not set" in _problems("--rlhf.ppo.reward_source", "function")


def test_expert_parallelism_and_unknown_lora_targets_are_refused():
    with pytest.raises(ConfigError) as err:
        _load("--deepspeed.zero_stage", "2", "--deepspeed.ep_size", "2", world=2)
    assert "RLHF engines do not support expert parallelism" in err.value.render()
    text = _problems("--rlhf.lora.enabled", "true", "--rlhf.lora.target_modules", "[q_proj, experts]")
    assert "'experts' not a linear layer" in text and "q_proj, k_proj" in text


def test_a_misspelt_stage_key_gets_a_did_you_mean():
    text = _problems("--rlhf.ppo.kl_coeff", "0.1")
    assert "kl_coeff" in text and "kl_coef" in text


def test_a_reward_function_must_look_like_module_colon_function():
    text = _problems("--rlhf.reward_function", "my_rewards.score")
    assert "rlhf.reward_function" in text and "module:function" in text


def test_ipo_with_label_smoothing_is_refused_before_anything_trains():
    assert "applies to the sigmoid (DPO) loss only" in _problems("--rlhf.dpo.loss_type", "ipo",
                                                                  "--rlhf.dpo.label_smoothing", "0.1")


def test_an_adaptive_controller_from_zero_and_a_target_without_one_are_reported():
    assert "it would stay 0" in _problems("--rlhf.ppo.kl_controller", "adaptive", "--rlhf.ppo.kl_target", "4",
                                          "--rlhf.ppo.kl_coef", "0")
    notices = [n.render() for n in _load("--rlhf.ppo.kl_target", "4").notices]
    assert any("rlhf.ppo.kl_target" in n and "no effect" in n for n in notices)


def test_lora_dropout_conflicts_with_disable_dropout_and_moe_experts_take_no_adapter():
    assert "rlhf.disable_dropout" in _problems("--rlhf.lora.enabled", "true", "--rlhf.lora.dropout", "0.1")
    assert _load("--rlhf.lora.enabled", "true", "--rlhf.lora.dropout", "0.1",
                 "--rlhf.disable_dropout", "false").config.rlhf.lora.dropout == 0.1
    text = _problems("--rlhf.lora.enabled", "true", "--rlhf.lora.target_modules", "[q_proj, up_proj]")
    assert "experts, stacked tensors" in text  # tiny.yaml is MoE without a shared expert
