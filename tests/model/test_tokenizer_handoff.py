"""A model leaves with its tokenizer: a run's model/, every export, HF import and init_from carry it along.

One 4-step run of a tiny dense model on a BPE trained from this Python's
standard library (about ten seconds) is shared by the run-level checks (marked
slow, with the RLHF stage that starts from its model); the
byte-tokenizer checks use a hand-built model whose greedy continuation of "a"
is "bc" and then the end-of-text id, so a wrong eos id in an export shows as
a generation that does not stop.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is a dev dependency: pip install -e .[dev]")

from ava.cli.model_cmd import COMMANDS  # noqa: E402
from ava.config import ConfigFiles, WorldSize, load_config  # noqa: E402
from ava.config.schema.data import DataConfig  # noqa: E402
from ava.config.schema.model import ModelConfig  # noqa: E402
from ava.data.model_tokens import ModelTokens, read_model_tokens, tokens_for_data  # noqa: E402
from ava.data.tokenizer import ByteTokenizer, FileTokenizer, load_saved_tokenizer, load_tokenizer  # noqa: E402
from ava.hf import export_hf  # noqa: E402
from ava.model import AvaForCausalLM  # noqa: E402
from ava.model.generate import generate  # noqa: E402
from ava.model.store import load_model_dir, save_model_dir  # noqa: E402
from ava.train.checkpoint.export import run_tokens  # noqa: E402
from ava.train.inputs.init_from import pretrained_for_run  # noqa: E402
from tests.conftest import REPO  # noqa: E402
from tests.train.run_helpers import TINY, run_env  # noqa: E402

RUN = ["--hidden_size", "32", "--num_layers", "1", "--intermediate_size", "64", "--num_attention_heads", "2",
       "--num_experts", "0", "--vocab_size", "320", "--tokenizer_name", "bpe", "--bpe_vocab_size", "300",
       "--bpe_training_bytes", "200000", "--max_length", "32", "--batch_size", "4", "--eval_batch_size", "4",
       "--max_eval_examples", "8", "--max_steps", "4", "--warmup_steps", "1", "--eval_steps", "4",
       "--save_steps", "4", "--logging_steps", "2"]
FINETUNE = str(REPO / "configs/recipes/nanogpt/finetune_gpt2.yaml")
PROMPT = "def main(self):\n    return"


@pytest.fixture(scope="module")
def bpe_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("handoff")
    out = root / "run"
    done = subprocess.run([sys.executable, "train.py", *TINY, *RUN, "--cache_dir", str(root / "cache"),
                           "--output_dir", str(out)], cwd=REPO, env=run_env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


def _cli(command: str, *args: str | Path) -> None:
    assert COMMANDS[command]([str(a) for a in args]) == 0


@pytest.mark.slow
def test_the_runs_model_dir_holds_its_bpe_and_summary_and_config_name_it(bpe_run: Path) -> None:
    summary = json.loads((bpe_run / "summary.json").read_text())
    entry = summary["tokenizer"]
    assert entry["kind"] == "bpe" and entry["path"] == str(bpe_run / "model" / "tokenizer.json")
    cached = load_tokenizer(entry["source"])  # the BPE in the cache the run trained
    assert "cache" in entry["source"] and entry["vocab_size"] == cached.vocab_size
    assert entry["eos_token_id"] == cached.eos_id
    saved = load_saved_tokenizer(bpe_run / "model")
    assert isinstance(saved, FileTokenizer) and saved.encode(PROMPT) == cached.encode(PROMPT)
    assert len(cached.encode(PROMPT)) < len(PROMPT.encode())  # a real BPE, not bytes
    # The copy written at the start, for checkpoints exported mid-run, and the line config.yaml ends with.
    assert load_saved_tokenizer(bpe_run / "tokenizer").encode(PROMPT) == cached.encode(PROMPT)
    assert f"# tokenizer: byte-level BPE trained on the corpus ({entry['source']})" in \
        (bpe_run / "config.yaml").read_text()


@pytest.mark.slow
def test_hf_export_of_the_run_generates_the_tokens_and_text_of_avas_generate(bpe_run: Path, tmp_path: Path) -> None:
    _cli("export-checkpoint", bpe_run, "--hf", "--out", tmp_path / "hf")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ours = load_saved_tokenizer(bpe_run / "model")
    assert ours is not None
    assert tokenizer.eos_token_id == model.config.eos_token_id == model.generation_config.eos_token_id == ours.eos_id
    assert model.config.bos_token_id == model.config.pad_token_id == ours.eos_id
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    assert ids[0].tolist() == ours.encode(PROMPT)
    with torch.no_grad():
        theirs = model.generate(ids, max_new_tokens=12, do_sample=False)
    expected = generate(load_model_dir(bpe_run / "model").eval(), ids, 12, temperature=0, eos_token_id=ours.eos_id)
    assert theirs.tolist() == expected.tolist()
    assert tokenizer.decode(theirs[0]) == ours.decode(expected[0].tolist())


@pytest.mark.slow
def test_an_ava_export_of_a_checkpoint_carries_the_tokenizer_and_export_hf_passes_it_on(bpe_run: Path,
                                                                                       tmp_path: Path) -> None:
    _cli("export-checkpoint", bpe_run / "checkpoints", "--out", tmp_path / "ava")
    tokens = read_model_tokens(tmp_path / "ava")
    assert tokens is not None and tokens.kind == "bpe" and tokens.tokenizer is not None
    assert tokens.tokenizer.encode(PROMPT) == load_saved_tokenizer(bpe_run / "model").encode(PROMPT)
    _cli("export-hf", tmp_path / "ava", "--out", tmp_path / "hf")
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf(PROMPT).input_ids == tokens.tokenizer.encode(PROMPT) and hf.eos_token_id == tokens.eos_id


def test_an_export_without_the_runs_copies_rebuilds_the_tokenizer_from_config_yaml(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text("data:\n  tokenizer_name: null\n")
    tokens = run_tokens(tmp_path)
    assert tokens is not None and isinstance(tokens.tokenizer, ByteTokenizer) and tokens.eos_id == 256
    (tmp_path / "config.yaml").write_text("data:\n  data_dir: /data/gpt2\n  eos_token_id: 50256\n")
    tokens = run_tokens(tmp_path)
    assert tokens is not None and tokens.tokenizer is None and tokens.ids() == dict.fromkeys(
        ("bos_token_id", "eos_token_id", "pad_token_id"), 50256)
    (tmp_path / "config.yaml").write_text("data:\n  tokenizer_name: bpe\n")  # never trained again to export
    tokens = run_tokens(tmp_path)
    assert tokens is not None and tokens.kind == "bpe" and tokens.tokenizer is None and tokens.eos_id is None


def _stops_after_bc() -> AvaForCausalLM:
    """A Llama-shaped byte model whose greedy continuation of "a" is "b", "c", then id 256.

    Attention and MLP write nothing (zero output projections), so the next
    token depends on the last one only: each token's embedding is a one-hot
    direction, and the head maps it to its successor.
    """
    cfg = ModelConfig(hidden_size=32, num_layers=1, num_attention_heads=2, intermediate_size=32, vocab_size=257,
                      max_position_embeddings=64, num_experts=0, tie_word_embeddings=False)
    model = AvaForCausalLM(cfg).eval()
    a, b, c, eos = ord("a"), ord("b"), ord("c"), ByteTokenizer.eos_id
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p.zero_()
        model.embed_tokens.weight.zero_()
        model.embed_tokens.weight[:, 0] = 1.0
        for token, direction in ((a, 1), (b, 2), (c, 3)):
            model.embed_tokens.weight[token] = 0.0
            model.embed_tokens.weight[token, direction] = 1.0
        head = model.lm_head.weight
        head.zero_()
        head[b, 1] = head[c, 2] = head[eos, 3] = head[eos, 0] = 10.0
    return model


def test_a_byte_model_exports_eos_256_and_hf_generate_stops_where_ava_does(tmp_path: Path) -> None:
    model = _stops_after_bc()
    export_hf(model, tmp_path / "hf", tokens=ModelTokens.of(ByteTokenizer()))
    for name in ("config.json", "generation_config.json"):
        ids = json.loads((tmp_path / "hf" / name).read_text())
        assert (ids["eos_token_id"], ids["bos_token_id"], ids["pad_token_id"]) == (256, 256, 256), name
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    prompt = "say é a"
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    assert ids[0].tolist() == ByteTokenizer().encode(prompt)
    with torch.no_grad():
        theirs = hf.generate(ids, max_new_tokens=10, do_sample=False)
    ours = generate(model, ids, 10, temperature=0, eos_token_id=ByteTokenizer.eos_id)
    assert theirs[0].tolist() == ours[0].tolist() == [*ids[0].tolist(), ord("b"), ord("c"), 256]
    assert tokenizer.decode(theirs[0], skip_special_tokens=True) == ByteTokenizer().decode(ours[0].tolist()) \
        == "say é abc"


def test_a_model_without_a_text_tokenizer_exports_null_ids_not_the_familys_defaults(tmp_path: Path) -> None:
    markov = tokens_for_data(DataConfig(builtin_dataset="markov"))
    assert markov.tokenizer is None and markov.eos_id is None
    export_hf(_stops_after_bc(), tmp_path / "hf", tokens=markov)
    config = transformers.AutoConfig.from_pretrained(tmp_path / "hf")
    assert (config.eos_token_id, config.bos_token_id) == (None, None)  # not LlamaConfig's 2 and 1
    assert not (tmp_path / "hf" / "tokenizer.json").exists()


def _hf_llama_with_tokenizer(directory: Path) -> None:
    """A tiny Llama saved by transformers with a word-level tokenizer whose eos is "</s>" (id 2)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(["<unk>", "<s>", "</s>"])
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=5, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                                   bos_token_id=1, eos_token_id=2)
    transformers.LlamaForCausalLM(cfg).save_pretrained(directory)
    transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                         unk_token="<unk>").save_pretrained(directory)


def test_import_hf_brings_the_tokenizer_and_its_ids_and_export_hf_gives_them_back(tmp_path: Path) -> None:
    _hf_llama_with_tokenizer(tmp_path / "hf")
    _cli("import-hf", tmp_path / "hf", "--out", tmp_path / "ava")
    tokens = read_model_tokens(tmp_path / "ava")
    assert tokens is not None and tokens.tokenizer is not None
    assert (tokens.eos_id, tokens.bos_id, tokens.pad_id) == (2, 1, None)
    assert tokens.tokenizer.encode("hello world") == [3, 4]
    _cli("export-hf", tmp_path / "ava", "--out", tmp_path / "back")
    back = transformers.AutoTokenizer.from_pretrained(tmp_path / "back")
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert (back.eos_token, back.bos_token, config["eos_token_id"], config["bos_token_id"]) == ("</s>", "<s>", 2, 1)
    assert back("hello world").input_ids == [3, 4]


@pytest.mark.slow
def test_init_from_a_model_with_a_bpe_uses_it_unless_the_config_names_a_tokenizer(bpe_run: Path,
                                                                                  tmp_path: Path) -> None:
    world = WorldSize(1, "test")
    flags = ["--training.init_from", str(bpe_run / "model"), "--max_length", "32"]
    resolved, source = pretrained_for_run(load_config(ConfigFiles(FINETUNE), flags, world), None)
    assert source is not None
    assert resolved.config.data.tokenizer_name == str(bpe_run / "model" / "tokenizer.json")
    assert "init_from" in resolved.origin("data.tokenizer_name").describe()
    assert resolved.to_dict()["data"]["tokenizer_name"] == resolved.config.data.tokenizer_name  # config.yaml
    explicit, _ = pretrained_for_run(load_config(ConfigFiles(FINETUNE), [*flags, "--tokenizer_name", "null"],
                                                 world), None)
    assert explicit.config.data.tokenizer_name is None
    # A byte model's tokenizer.json is the byte tokenizer: the run keeps bytes (and their fast path).
    byte_dir = tmp_path / "byte"
    save_model_dir(load_model_dir(bpe_run / "model"), byte_dir)
    ModelTokens.of(ByteTokenizer()).save(byte_dir)
    flags[1] = str(byte_dir)
    kept, _ = pretrained_for_run(load_config(ConfigFiles(FINETUNE), flags, world), None)
    assert kept.config.data.tokenizer_name is None
    # Resumed after the pretrained directory went away: the run's own copy stands in for it.
    flags[1] = str(tmp_path / "gone")
    resumed, _ = pretrained_for_run(load_config(ConfigFiles(FINETUNE), flags, world), bpe_run)
    assert resumed.config.data.tokenizer_name == str(bpe_run / "tokenizer" / "tokenizer.json")


@pytest.mark.slow
def test_an_rlhf_stage_reads_and_saves_the_tokenizer_of_its_starting_policy(bpe_run: Path, tmp_path: Path) -> None:
    shape = ["--hidden_size", "32", "--num_layers", "1", "--intermediate_size", "64", "--num_attention_heads", "2",
             "--vocab_size", "320", "--max_length", "64", "--num_experts", "0"]
    done = subprocess.run([sys.executable, "train_rlhf.py", *TINY, "--rlhf_config", "configs/rlhf/test_cpu.yaml",
                           *shape, "--rlhf.stages", "[sft]", "--rlhf.sft.steps", "2",
                           "--rlhf.policy_path", str(bpe_run / "model"), "--output_dir", str(tmp_path / "rlhf")],
                          cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    policy = load_saved_tokenizer(bpe_run / "model")
    stage = read_model_tokens(tmp_path / "rlhf" / "sft" / "model")
    assert policy is not None and stage is not None and stage.tokenizer is not None
    assert stage.tokenizer.encode(PROMPT) == policy.encode(PROMPT) and stage.eos_id == policy.eos_id
