"""`training.init_from`: a local GPT-2 checkpoint becomes the model train.py starts from, logit for logit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ava.config import ConfigError, ConfigFiles, WorldSize, load_config
from ava.config.pretrained import locate
from ava.errors import UserError
from ava.hf.pretrained import load_weights
from ava.model import AvaForCausalLM
from ava.model.store import load_state_exactly, save_model_dir
from ava.train.inputs.init_from import pretrained_for_run
from tests.conftest import REPO
from tests.recipes.conftest import VOCAB, save_tiny_gpt2

FINETUNE = str(REPO / "configs/recipes/nanogpt/finetune_gpt2.yaml")


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_gpt2(tmp_path_factory.mktemp("gpt2"))


def _resolve(config: str, *overrides: str, ranks: int = 1):
    return pretrained_for_run(load_config(ConfigFiles(config), overrides, WorldSize(ranks, "test")), None)


def test_model_built_as_train_py_builds_it_gives_the_logits_of_transformers(gpt2_dir: Path) -> None:
    from transformers import GPT2LMHeadModel

    resolved, source = _resolve(FINETUNE, "--training.init_from", str(gpt2_dir), "--max_length", "32")
    assert source is not None and source.kind == "hf"
    model = AvaForCausalLM(resolved.config.model)  # what ava.train.pretraining.train does with initial_state
    load_state_exactly(model, load_weights(source), str(gpt2_dir))
    model.eval()
    reference = GPT2LMHeadModel.from_pretrained(gpt2_dir).eval()
    tokens = torch.randint(0, VOCAB, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model(tokens).logits, reference(tokens).logits
    assert torch.allclose(ours, theirs, atol=1e-5), float((ours - theirs).abs().max())


def test_checkpoint_architecture_replaces_unset_shape_keys_and_keeps_training_choices(gpt2_dir: Path) -> None:
    resolved, _ = _resolve(FINETUNE, "--training.init_from", str(gpt2_dir), "--max_length", "32")
    m = resolved.config.model
    assert (m.hidden_size, m.num_layers, m.vocab_size, m.max_position_embeddings) == (64, 2, VOCAB, 64)
    assert (m.position_embedding_type, m.norm_type, m.use_bias) == ("learned", "layernorm", True)
    assert m.hidden_dropout == 0.1  # the recipe's dropout, not the checkpoint's 0.0
    assert "init_from" in resolved.origin("model.hidden_size").describe()
    assert resolved.to_dict()["model"]["hidden_size"] == 64  # what the run's config.yaml records


def test_conflicting_explicit_shape_key_is_refused_naming_file_and_values(gpt2_dir: Path) -> None:
    tiny = str(REPO / "configs/gpu/tiny.yaml")
    with pytest.raises(ConfigError) as caught:
        _resolve(tiny, "--training.init_from", str(gpt2_dir), "--max_length", "32")
    message = str(caught.value)
    assert "model.hidden_size = 256" in message and "configs/gpu/tiny.yaml:" in message
    assert "checkpoint has 64" in message


def test_matching_explicit_shape_keys_are_accepted(tmp_path: Path) -> None:
    resolved = load_config(ConfigFiles(str(REPO / "configs/gpu/tiny.yaml")), ["--max_length", "32"])
    save_model_dir(AvaForCausalLM(resolved.config.model), tmp_path / "model")
    adopted, source = _resolve(str(REPO / "configs/gpu/tiny.yaml"), "--training.init_from", str(tmp_path),
                               "--max_length", "32")  # a run directory: its model/ is used
    assert source is not None and source.kind == "ava" and source.path == tmp_path / "model"
    assert adopted.config.model == resolved.config.model


def test_checks_judge_the_checkpoints_model_not_the_configs(gpt2_dir: Path) -> None:
    # Sequence length against the checkpoint's 64 positions.
    with pytest.raises(ConfigError, match=r"data.max_length = 1024: exceeds model.max_position_embeddings = 64"):
        _resolve(FINETUNE, "--training.init_from", str(gpt2_dir))
    # The checkpoint is dense: LoRA on its FFN is fine (the default model: section would be an MoE) ...
    resolved, _ = _resolve(FINETUNE, "--training.init_from", str(gpt2_dir), "--max_length", "32",
                           "--training.lora.enabled", "true", "--training.lora.target_modules", "[q_proj,up_proj]")
    assert not resolved.config.model.is_moe
    # ... and expert parallelism has no experts to split.
    with pytest.raises(ConfigError, match="ep_size"):
        _resolve(FINETUNE, "--training.init_from", str(gpt2_dir), "--max_length", "32", "--deepspeed.ep_size", "2",
                 ranks=2)


def test_missing_directory_is_a_warning_when_validating_and_an_error_when_training(tmp_path: Path) -> None:
    resolved = load_config(ConfigFiles(FINETUNE), ["--training.init_from", str(tmp_path / "gone")])
    assert any("does not exist" in n.render() for n in resolved.notices)
    with pytest.raises(UserError, match="does not exist"):
        pretrained_for_run(resolved, None)


def test_resumed_run_rebuilds_the_recorded_architecture_without_the_pretrained_directory(tmp_path: Path,
                                                                                        gpt2_dir: Path) -> None:
    from ava.config.render import render_yaml

    started, _ = _resolve(FINETUNE, "--training.init_from", str(gpt2_dir), "--max_length", "32")
    (tmp_path / "config.yaml").write_text(render_yaml(started, with_origins=True))  # what train.py writes
    moved = load_config(ConfigFiles(FINETUNE), ["--training.init_from", str(tmp_path / "moved"), "--max_length", "32"])
    resumed, source = pretrained_for_run(moved, tmp_path)
    assert source is None and resumed.config.model == started.config.model


@pytest.mark.parametrize(("make", "expected"), [
    (lambda p: p / "missing", "does not exist"),
    (lambda p: p, "holds neither ava_model.yaml"),
])
def test_unusable_init_from_directory_says_what_to_point_at(tmp_path: Path, make, expected: str) -> None:
    with pytest.raises(UserError, match=expected):
        locate(make(tmp_path))


def test_init_from_carries_the_checkpoints_enhanced_features_and_refuses_moa_from_plain_attention(tmp_path):
    from pathlib import Path

    from ava.config.pretrained import Pretrained, adopt_architecture
    from ava.config.schema.model import ModelConfig
    from ava.errors import UserError

    small = dict(hidden_size=32, num_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=64,
                 max_position_embeddings=64)
    with_features = Pretrained(Path(tmp_path), "ava", ModelConfig(
        **small, use_moh=True, moh={"num_shared_heads": 1, "active_routed_heads": 1}, use_episodic_memory=True))
    adopted = adopt_architecture(ModelConfig(), with_features, set(), {})
    assert adopted.use_moh and adopted.moh.active_routed_heads == 1 and adopted.use_episodic_memory
    plain = Pretrained(Path(tmp_path), "ava", ModelConfig(**small))
    with pytest.raises(UserError, match="does not use MoA"):
        adopt_architecture(ModelConfig(use_moa=True), plain, {"use_moa"}, {"use_moa": "c.yaml:3"})
    cross = adopt_architecture(ModelConfig(use_cross_attention=True, use_rag=True), plain, {"use_rag"}, {})
    assert cross.use_cross_attention and cross.hidden_size == 32  # a plain model gains the closed-gate blocks
