"""The recipes at full size: the batch arithmetic each source setup relied on, and their settings.

Loaded exactly as train.py loads them (every layer, every check), for the GPU counts they were written
for, without training anything.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from ava.config import ConfigFiles, WorldSize, load_config
from ava.config.loader import ResolvedConfig
from tests.conftest import REPO

RECIPES = sorted(p.relative_to(REPO / "configs" / "recipes").with_suffix("").as_posix()
                 for p in (REPO / "configs" / "recipes").rglob("*.yaml"))


def _load(recipe: str, ranks: int = 1, overrides: tuple[str, ...] = ()) -> ResolvedConfig:
    return load_config(ConfigFiles(str(REPO / "configs" / "recipes" / f"{recipe}.yaml")), overrides,
                       WorldSize(ranks, f"{ranks} GPU(s) in the test"))


def test_every_recipe_is_listed_in_the_recipes_index() -> None:
    index = (REPO / "configs" / "recipes" / "README.md").read_text()
    assert len(RECIPES) == 9
    for recipe in RECIPES:
        assert f"{recipe}.yaml" in index, recipe


@pytest.mark.parametrize(("recipe", "micro", "accumulation", "on_two_gpus"), [
    ("ehr_fm/monolith", 32, 16, 1024), ("ehr_fm/moe_2exp", 16, 16, 512), ("ehr_fm/moe_4exp", 16, 16, 512),
    ("ehr_fm/tiny", 16, 4, 128)])
def test_ehr_fm_recipes_reproduce_their_effective_batch_on_two_gpus(recipe: str, micro: int, accumulation: int,
                                                                    on_two_gpus: int) -> None:
    b = _load(recipe, ranks=2).batch
    assert (b.micro, b.accumulation, b.global_batch) == (micro, accumulation, on_two_gpus)
    # One GPU halves it, as EHR_FM's world_size=1 runs did: the per-GPU settings are what the recipe fixes.
    assert _load(recipe, ranks=1).batch.global_batch == on_two_gpus // 2


def test_ehr_fm_recipes_share_the_ethos_hyperparameters() -> None:
    for recipe in ("ehr_fm/monolith", "ehr_fm/moe_2exp", "ehr_fm/moe_4exp"):
        c = _load(recipe).config
        m, t = c.model, c.training
        assert (m.num_layers, m.hidden_size, m.num_attention_heads, m.hidden_dropout) == (6, 768, 12, 0.3)
        assert (t.learning_rate, t.lr_end, t.warmup_steps, t.lr_scheduler_type) == (6e-4, 6e-5, 5000, "cosine")
        assert (t.beta1, t.beta2, t.weight_decay, t.max_gradient_norm) == (0.9, 0.95, 0.1, 1.0)
        assert t.gradient_health.initial_clip_value == t.gradient_health.final_clip_value == 1.0
        assert t.mixed_precision == "bf16" and c.data.data_dir is not None
        assert (t.save_strategy, t.save_steps, t.save_best_checkpoint) == ("steps", 1000, True)
    assert not _load("ehr_fm/monolith").config.model.is_moe
    for recipe, experts in (("ehr_fm/moe_2exp", 2), ("ehr_fm/moe_4exp", 4)):
        m = _load(recipe).config.model
        assert (m.num_experts, m.num_experts_per_token) == (experts, 2)


@pytest.mark.parametrize(("recipe", "ranks", "accumulation"), [
    ("nanogpt/gpt2_124m", 1, 12), ("nanogpt/gpt2_124m", 2, 6), ("nanogpt/gpt2_124m", 4, 3),
    ("nanogpt/gpt2_124m_8gpu", 8, 5), ("nanogpt/gpt2_124m_8gpu", 4, 10), ("nanogpt/gpt2_124m_8gpu", 1, 40)])
def test_nanogpt_recipes_keep_the_global_batch_by_adjusting_accumulation(recipe: str, ranks: int,
                                                                         accumulation: int) -> None:
    resolved = _load(recipe, ranks)
    b = resolved.batch
    micro, tokens = (4, 49_152) if recipe == "nanogpt/gpt2_124m" else (12, 491_520)
    assert (b.micro, b.accumulation) == (micro, accumulation)
    assert b.tokens_per_step(resolved.config.data.max_length) == tokens
    notes = [n.render() for n in resolved.notices]
    assert any(f"gradient_accumulation_steps: set to {accumulation}" in n for n in notes), notes


def test_nanogpt_single_and_eight_gpu_recipes_differ_only_in_batch_geometry() -> None:
    batch_keys = {("training", "batch_size"), ("training", "gradient_accumulation_steps"),
                  ("deepspeed", "train_batch_size"), ("deepspeed", "micro_batch_size"),
                  ("deepspeed", "gradient_accumulation_steps"), ("data", "train_batch_size"),
                  ("data", "eval_batch_size"), ("data", "max_eval_examples"), ("hardware", "name")}
    one, eight = _load("nanogpt/gpt2_124m").to_dict(), _load("nanogpt/gpt2_124m_8gpu", 8).to_dict()
    differing = {(section, key) for section in one for key in one[section]
                 if one[section][key] != eight[section][key]}
    assert differing <= batch_keys, differing - batch_keys
    assert ("training", "batch_size") in differing


def test_nanogpt_fine_tune_recipe_is_a_constant_lr_that_saves_only_improvements() -> None:
    t = _load("nanogpt/finetune_gpt2").config.training
    assert t.init_from is not None
    assert (t.learning_rate, t.lr_scheduler_type, t.warmup_steps) == (3e-5, "constant", 0)
    assert t.save_strategy == "best"


def test_promptehr_recipe_warms_up_then_decays_linearly_to_zero() -> None:
    from ava.train.engine.lr_schedule import LRSchedule

    t = _load("promptehr/promptehr").config.training
    schedule = LRSchedule(peak=t.learning_rate, end=t.lr_end, warmup_steps=t.warmup_steps, total_steps=11000,
                          warmup=t.warmup_schedule, decay=t.lr_scheduler_type)
    assert schedule.lr(500) == pytest.approx(0.5e-4, rel=1e-2)
    assert schedule.lr(1000) == pytest.approx(1e-4)
    assert schedule.lr(6000) == pytest.approx(0.5e-4, rel=1e-2)
    assert schedule.lr(10999) < 1e-7
    assert (t.beta2, t.weight_decay, t.save_best_checkpoint) == (0.999, 0.01, True)


def test_behrt_recipe_at_full_size_trains_a_few_percent_and_does_not_warn() -> None:
    from ava.model import AvaForCausalLM
    from ava.model.lora import apply_training_lora, lora_warnings, parameter_report

    c = _load("behrt/lora").config
    model = AvaForCausalLM(c.model)
    apply_training_lora(model, c.training.lora)
    report = parameter_report(model)
    assert 2 < report.trainable_percent < 30, report.line()
    assert report.lora > 0 and report.embeddings_trainable > 0 and report.head_trainable > 0
    assert lora_warnings(report, c.training.lora, from_scratch=True) == []


def test_promptehr_slurm_script_renders_with_its_job_settings(capsys: pytest.CaptureFixture[str],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from ava.cli.launch_cmd import slurm

    monkeypatch.chdir(REPO)
    assert slurm(["--config", "configs/recipes/promptehr/promptehr.yaml", "--nodes", "1", "--gpus_per_node", "1",
                  "--partition", "IllinoisComputes-GPU", "--time", "48:00:00", "--mem", "64G",
                  "--cpus_per_task", "8", "--job_name", "promptehr"]) == 0
    script = capsys.readouterr().out
    for option in ("--partition=IllinoisComputes-GPU", "--time=48:00:00", "--mem=64G", "--cpus-per-task=8",
                   "--job-name=promptehr", "--nodes=1", "--gpus-per-node=1"):
        assert f"#SBATCH {option}" in script, option
    assert str(Path(REPO / "configs/recipes/promptehr/promptehr.yaml")) in script


def test_recipe_learning_rates_end_below_their_peak() -> None:
    for recipe in RECIPES:
        if recipe == "nanogpt/finetune_gpt2":
            continue  # init_from points at a directory the user provides
        t = _load(recipe).config.training
        assert t.lr_end <= t.learning_rate and math.isfinite(t.learning_rate), recipe


@pytest.mark.parametrize(("overrides", "expected"), [
    (("--training.lora.train_embeddings", "false", "--training.lora.train_head", "false"),
     "WARNING: the embeddings and output head are frozen at their random initialisation"),
    (("--training.lora.freeze_base", "false"), "WARNING: 100.0% of the parameters are trainable under LoRA"),
])
def test_dry_run_reports_parameters_and_warns_about_lora_misconfiguration(
        overrides: tuple[str, ...], expected: str, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    from ava.cli.train_cmd import main

    monkeypatch.chdir(REPO)
    assert main(["--config", "configs/recipes/behrt/lora.yaml", "--dry_run", *overrides]) == 0
    out = capsys.readouterr().out
    assert expected in out
    assert "parameters: 4,723,968 total" in out  # the full-size BEHRT recipe, counted on the meta device
