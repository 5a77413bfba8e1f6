"""The schema forbids unknown keys at every depth and enforces the cross-field rules."""

from __future__ import annotations

import pytest

from ava.config import ConfigError, ConfigFiles, WorldSize, load_config

ONE = WorldSize(1, "test")


def _problems(write_yaml, text: str, *overrides: str) -> str:
    path = write_yaml("c.yaml", text)
    with pytest.raises(ConfigError) as err:
        load_config(ConfigFiles(path), list(overrides), world=ONE)
    return str(err.value)


@pytest.mark.parametrize("text, line, suggestion", [
    ("trainig:\n  batch_size: 8\n", 1, "'training'"),
    ("model:\n  hiden_size: 8\n", 2, "'hidden_size'"),
    ("training:\n  gradient_health:\n    enabld: true\n", 3, "'enabled'"),
    ("deepspeed:\n  optimizer:\n    params:\n      lrr: 0.1\n", 4, "'lr'"),
])
def test_misspelt_key_at_any_depth_fails_with_file_line_and_suggestion(write_yaml, text, line, suggestion):
    message = _problems(write_yaml, text)
    assert f"c.yaml:{line}" in message and "did you mean " + suggestion in message


def test_key_in_the_wrong_section_says_where_it_belongs(write_yaml):
    message = _problems(write_yaml, "training:\n  hidden_size: 8\n")
    assert "belongs under model:" in message


def test_every_problem_is_reported_at_once(write_yaml):
    message = _problems(write_yaml, """\
model:
  hiden_size: 8
training:
  batch_size: "8"
  learning_rate: -1
data:
  padding_side: middle
""")
    assert "4 problems" in message
    for fragment in ("c.yaml:2", "c.yaml:4", "c.yaml:5", "c.yaml:7", "'left', 'right'"):
        assert fragment in message


@pytest.mark.parametrize("text, fragment", [
    ("model:\n  hidden_size: 100\n  num_attention_heads: 12\n", "divisible"),
    ("model:\n  num_experts: 4\n  num_experts_per_token: 5\n", "more experts than exist"),
    ("model:\n  num_experts: 4\n  num_experts_per_token: 2\n  router_type: switch\n", "exactly one expert"),
    ("training:\n  warmup_steps: 100\n  max_steps: 100\n", "smaller than training.max_steps"),
    ("training:\n  learning_rate: 1e-4\n  lr_end: 1e-3\n", "must not exceed training.learning_rate"),
    ("model:\n  max_position_embeddings: 128\ndata:\n  max_length: 256\n", "max_position_embeddings"),
    ("deepspeed:\n  zero_stage: 2\n  nvme_offload: true\n  nvme_path: /nvme\n", "needs zero_stage 3"),
    ("deepspeed:\n  cpu_offload: true\n", "needs ZeRO stage 1, 2 or 3"),
    ("training:\n  mixed_precision: bf16\ndeepspeed:\n  fp8_enabled: true\n", "disagrees with the precision"),
    ("model:\n  num_experts: 4\ndeepspeed:\n  zero_stage: 2\n  ep_size: 3\n", "must divide model.num_experts = 4"),
    ("model:\n  num_experts: 4\ndeepspeed:\n  zero_stage: 3\n  ep_size: 2\n", "needs ZeRO stage 1 or 2, not 3"),
    ("model:\n  num_experts: 0\ndeepspeed:\n  zero_stage: 2\n  ep_size: 2\n", "the model has no experts"),
    ("model:\n  num_experts: 4\ndeepspeed:\n  zero_stage: 1\n  ep_size: 4\n", "must divide the number of ranks"),
])
def test_cross_field_rules(write_yaml, text, fragment):
    assert fragment in _problems(write_yaml, text)


@pytest.mark.parametrize("text", [
    "model:\n  use_moh: true\n",
    "model:\n  use_moa: true\n",
    "model:\n  use_episodic_memory: true\n",
    "model:\n  use_rag: true\n  use_cross_attention: true\n",
    "model:\n  use_moh: true\n  use_moa: true\n  moa:\n    every_n_layers: 2\n  use_rag: true\n"
    "  use_cross_attention: true\n  use_episodic_memory: true\n",
])
def test_enhanced_features_validate_with_their_defaults(write_yaml, text):
    path = write_yaml("ok.yaml", text)
    model = load_config(ConfigFiles(path), world=ONE).config.model
    assert any(getattr(model, f) for f in ("use_moh", "use_moa", "use_rag", "use_episodic_memory"))


@pytest.mark.parametrize("text, fragment", [
    ("model:\n  num_attention_heads: 12\n  use_moh: true\n  moh:\n    num_shared_heads: 12\n",
     "leaves no head to route"),
    ("model:\n  num_attention_heads: 12\n  use_moh: true\n  moh:\n    num_shared_heads: 10\n"
     "    active_routed_heads: 3\n", "exceeds the 2 routed heads"),
    ("model:\n  use_moa: true\n  moa:\n    num_experts: 2\n    experts_per_token: 3\n",
     "cannot use more attention experts than exist"),
    ("model:\n  num_attention_heads: 12\n  num_key_value_heads: 4\n  use_moa: true\n  moa:\n"
     "    heads_per_expert: 6\n", "cannot share the 4 key/value heads"),
    ("model:\n  use_cross_attention: true\n", "would read nothing"),
    ("model:\n  use_rag: true\n", "model.use_cross_attention is false"),
    ("model:\n  use_rag: true\n  use_cross_attention: true\n  rag:\n    chunk_size: 100\n"
     "data:\n  max_length: 512\n", "must divide data.max_length = 512"),
    ("model:\n  use_episodic_memory: true\n  episodic_memory:\n    segment_length: 512\n"
     "data:\n  max_length: 512\n", "the memory would never hold anything"),
    ("model:\n  num_layers: 4\n  use_episodic_memory: true\n  episodic_memory:\n    layer: 4\n",
     "the model has layers 0..3"),
    ("model:\n  use_moa: true\ntraining:\n  lora:\n    enabled: true\n    target_modules: [q_proj, v_proj]\n",
     "q_proj: with model.use_moa the MoA layers' query and output projections are stacked"),
    ("model:\n  use_moh: true\n  use_moa: true\n", "no layer would get MOH"),
    ("model:\n  num_layers: 4\n  use_moa: true\n  moa:\n    every_n_layers: 4\n  use_episodic_memory: true\n",
     "no layer would get MOA"),
    ("model:\n  use_rag: true\n  use_cross_attention: true\n  rag:\n    chunk_size: 256\n"
     "data:\n  max_length: 256\n", "would have fewer than two chunks"),
    ("model:\n  use_rag: true\n  use_cross_attention: true\n  rag:\n    encoder: /models/bert\n"
     "data:\n  builtin_dataset: markov\n", "no tokenizer to turn them back into text"),
])


def test_enhanced_feature_rules(write_yaml, text, fragment):
    assert fragment in _problems(write_yaml, text)


def test_a_bad_data_section_beside_the_features_is_reported_not_a_crash(write_yaml):
    message = _problems(write_yaml, "model:\n  use_episodic_memory: true\ndata:\n  max_length: -5\n")
    assert "data.max_length" in message


def test_token_files_without_an_eos_id_warn_that_rows_count_as_documents(write_yaml, tmp_path):
    path = write_yaml("c.yaml", f"model:\n  use_episodic_memory: true\ndata:\n  data_dir: {tmp_path}\n")
    notices = load_config(ConfigFiles(path), world=ONE).notices
    assert any("every row counts as one document" in n.message and "eos_token_id" in n.message for n in notices)
    path = write_yaml("d.yaml", f"model:\n  use_episodic_memory: true\ndata:\n  data_dir: {tmp_path}\n"
                                "  eos_token_id: 50256\n")
    assert not any("every row counts" in n.message for n in load_config(ConfigFiles(path), world=ONE).notices)
def test_fp8_interval_is_accepted_with_a_warning_saying_why(write_yaml):
    path = write_yaml("c.yaml", "deepspeed:\n  fp8_interval: 1\n")
    r = load_config(ConfigFiles(path), world=ONE)
    warnings = [n for n in r.notices if n.key == "deepspeed.fp8_interval"]
    assert len(warnings) == 1 and warnings[0].where == f"{path}:2" and "no effect" in warnings[0].message


def test_fp8_on_hardware_without_fp8_units_runs_emulated_and_says_so(write_yaml):
    path = write_yaml("c.yaml", "hardware:\n  name: A100\n  accelerator: cuda\n  fp8: false\n"
                                "training:\n  mixed_precision: fp8\n")
    r = load_config(ConfigFiles(path), world=ONE)
    assert any("emulated" in n.message for n in r.notices)
    assert r.config.deepspeed.fp8_enabled is True


def test_precision_the_hardware_lacks_is_an_error(write_yaml):
    message = _problems(write_yaml, "hardware:\n  accelerator: cpu\n  fp16: false\ntraining:\n  mixed_precision: fp16\n")
    assert "fp16 is not supported" in message and "bf16" in message


def test_sizes_written_in_float_notation_are_whole_numbers(write_yaml):
    path = write_yaml("c.yaml", "deepspeed:\n  reduce_bucket_size: 5e8\n")
    assert load_config(ConfigFiles(path), world=ONE).config.deepspeed.reduce_bucket_size == 500_000_000
    assert "whole number" in _problems(write_yaml, "deepspeed:\n  reduce_bucket_size: 2.5\n")


def test_same_setting_twice_in_one_file_with_different_values_is_an_error(write_yaml):
    message = _problems(write_yaml, "training:\n  batch_size: 8\ndeepspeed:\n  micro_batch_size: 4\n")
    assert "c.yaml:2" in message and "c.yaml:4" in message and "alternative names" in message


def test_problems_inside_a_list_item_name_the_item_and_the_allowed_keys(write_yaml):
    message = _problems(write_yaml, "data:\n  sources:\n    - path: a.jsonl\n      wieght: 2\n    - path: b.csv\n"
                                    "      format: xml\n")
    assert "data.sources[0].wieght" in message and "did you mean 'weight'" in message
    assert "data.sources[1].format" in message and "'parquet'" in message


def test_an_eos_penalty_without_a_minimum_length_would_do_nothing_and_is_refused(write_yaml):
    message = _problems(write_yaml, "training:\n  eos_penalty_weight: 5.0\n  min_sequence_length: 0\n")
    assert "c.yaml:2" in message and "training.min_sequence_length" in message
