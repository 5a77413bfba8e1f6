"""`ava generate`: text from a run, a model, a checkpoint or a Hugging Face directory, and its user errors.

The reproduction test trains a two-step byte-level run with a tiny learning
rate, so the model is still close to its random initialisation and its greedy
continuation is a jumble of bytes that only the exact weights reproduce (a
trained one would print spaces, which any model near it prints too).
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ava.cli.main import main
from ava.config.schema.model import ModelConfig
from ava.data.model_tokens import ModelTokens
from ava.data.tokenizer import ByteTokenizer
from ava.model import AvaForCausalLM
from ava.model.store import save_model_dir
from ava.train.text_generation import Sampling, generate_text
from ava.train.trained_model import load_trained
from tests.conftest import REPO
from tests.train.run_helpers import TINY, run_env

CONTEXT = 32


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("generate") / "run"
    flags = ["--builtin_dataset", "python_stdlib", "--hidden_size", "64", "--num_layers", "2",
             "--intermediate_size", "128", "--vocab_size", "260", "--max_length", "64", "--batch_size", "4",
             "--eval_batch_size", "4", "--max_eval_examples", "8", "--warmup_steps", "1", "--logging_steps", "2",
             "--max_steps", "2", "--eval_steps", "2", "--save_steps", "2", "--sample_max_new_tokens", "24",
             "--learning_rate", "1e-5", "--lr_end", "1e-6", "--output_dir", str(out)]
    done = subprocess.run([sys.executable, "train.py", *TINY, *flags], cwd=REPO, env=run_env(), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small random byte-level model directory, as a run's model/ holds it (weights, tokenizer, special ids)."""
    torch.manual_seed(0)
    config = ModelConfig(hidden_size=32, num_layers=2, num_attention_heads=4, intermediate_size=48, vocab_size=260,
                         max_position_embeddings=CONTEXT)
    out = save_model_dir(AvaForCausalLM(config), tmp_path_factory.mktemp("model") / "model")
    ModelTokens.of(ByteTokenizer()).save(out)
    return out


def _generate(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    status = main(["generate", *args])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def _end_of_run_settings(sample: dict) -> list[str]:
    """The end-of-run sample's settings: greedy, through the end-of-document id, as many tokens as it has."""
    return ["--prompt", sample["prompt"], "--temperature", "0", "--ignore_eos",
            "--max_new_tokens", str(len(sample["continuation_ids"]))]


def test_generate_from_a_run_gives_the_end_of_run_sample(run, capsys):
    sample = json.loads((run / "summary.json").read_text())["sample"]
    assert ByteTokenizer().encode(sample["prompt"]) == sample["prompt_ids"]  # the text is the same prompt
    assert len(set(sample["continuation_ids"])) > 5  # a continuation only these weights give
    status, out, err = _generate(capsys, str(run), *_end_of_run_settings(sample), "--continuation_only")
    assert status == 0, err
    assert out == sample["continuation"] + "\n"
    assert f"Ava model {run / 'model'}" in err and "byte tokenizer" in err
    status, echoed, _ = _generate(capsys, str(run), *_end_of_run_settings(sample))
    assert status == 0 and echoed == sample["prompt"] + sample["continuation"] + "\n"  # the prompt, then the text
    trained = load_trained(run)
    ids = generate_text(trained.model, trained.tokenizer, sample["prompt"],
                        Sampling(len(sample["continuation_ids"]), temperature=0, stop_at_eos=False))[0]
    assert ids.continuation_ids == sample["continuation_ids"]  # token for token, not only the decoded text


def test_a_run_without_model_dir_generates_from_its_latest_checkpoint(run, tmp_path, capsys):
    sample = json.loads((run / "summary.json").read_text())["sample"]
    unfinished = tmp_path / "unfinished"
    shutil.copytree(run, unfinished, ignore=shutil.ignore_patterns("model"))  # as if killed before its export
    for path in (unfinished, unfinished / "checkpoints" / "step00000002"):
        status, out, err = _generate(capsys, str(path), *_end_of_run_settings(sample), "--continuation_only")
        assert status == 0, err
        assert f"checkpoint {unfinished / 'checkpoints' / 'step00000002'}" in err
        assert out == sample["continuation"] + "\n"


def test_a_seed_repeats_the_samples_and_several_samples_are_marked(model_dir, capsys):
    args = [str(model_dir), "--prompt", "def ", "--temperature", "1.0", "--max_new_tokens", "12", "--seed", "7"]
    status, first, err = _generate(capsys, *args, "--num_samples", "3")
    assert status == 0, err
    assert _generate(capsys, *args, "--num_samples", "3")[1] == first
    assert first.startswith("--- sample 1 of 3 ---\ndef ")
    texts = [block for block in first.split("\n--- sample ") if block]
    assert len(texts) == 3 and len(set(t.split("---\n", 1)[1] for t in texts)) == 3  # three different samples
    one = _generate(capsys, *args)[1]  # one sample: no marker, and the first of the three
    assert one == first.split("--- sample 1 of 3 ---\n", 1)[1].split("--- sample 2 of 3 ---\n")[0]
    assert _generate(capsys, *args[:-1], "8")[1] != one


def test_the_prompt_can_come_on_stdin(model_dir, capsys):
    args = [str(model_dir), "--temperature", "0", "--max_new_tokens", "6"]
    done = subprocess.run([sys.executable, "-m", "ava", "generate", *args], input="import os\n", cwd=REPO,
                          env=run_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout == _generate(capsys, *args, "--prompt", "import os")[1]  # less echo's newline


def test_an_imported_hugging_face_directory_generates_the_same_text(model_dir, tmp_path, capsys):
    from ava.hf import export_hf
    from ava.model.store import load_model_dir

    export_hf(load_model_dir(model_dir), tmp_path / "hf", tokens=ModelTokens.of(ByteTokenizer()))
    args = ["--prompt", "class ", "--temperature", "0", "--max_new_tokens", "10"]
    status, out, err = _generate(capsys, str(tmp_path / "hf"), *args)
    assert status == 0, err
    assert "Hugging Face checkpoint" in err and out == _generate(capsys, str(model_dir), *args)[1]


def test_a_prompt_longer_than_the_context_names_the_numbers_and_the_fix(model_dir, capsys):
    status, _, err = _generate(capsys, str(model_dir), "--prompt", "x" * 30, "--max_new_tokens", "5")
    assert status == 2 and "Traceback" not in err
    assert "the prompt is 30 tokens and --max_new_tokens is 5: 35 exceeds the model's context of 32" in err
    assert "lower --max_new_tokens to 2" in err
    status, _, err = _generate(capsys, str(model_dir), "--prompt", "x" * 40)
    assert status == 2 and "shorten the prompt to fewer than 32 tokens" in err


def test_a_model_without_a_tokenizer_asks_for_one(model_dir, tmp_path, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("ava_model.yaml", "model.safetensors"):
        shutil.copy(model_dir / name, bare / name)
    status, out, err = _generate(capsys, str(bare), "--prompt", "x", "--max_new_tokens", "3")
    assert status == 2 and out == "" and "Traceback" not in err
    assert "no tokenizer is saved with Ava model" in err and "--tokenizer PATH" in err and "--tokenizer bytes" in err
    status, out, err = _generate(capsys, str(bare), "--prompt", "x", "--max_new_tokens", "3", "--tokenizer", "bytes",
                                 "--temperature", "0")
    assert status == 0, err
    assert out == _generate(capsys, str(model_dir), "--prompt", "x", "--max_new_tokens", "3", "--temperature", "0")[1]
    status, _, err = _generate(capsys, str(bare), "--prompt", "x", "--tokenizer", str(tmp_path / "none.json"))
    assert status == 2 and "none.json does not exist" in err


@pytest.mark.parametrize(("setup", "needle"), [
    ("missing", "does not exist"),
    ("empty_dir", "holds no model: no ava_model.yaml"),
    ("file", "is a file, not a directory"),
    ("corrupt", "truncated or corrupt"),
])
def test_a_path_that_holds_no_readable_model_is_a_user_error(setup, needle, model_dir, tmp_path, capsys):
    path = tmp_path / "target"
    if setup == "empty_dir":
        path.mkdir()
    elif setup == "file":
        path.write_text("not a model")
    elif setup == "corrupt":
        shutil.copytree(model_dir, path)
        weights = path / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
    status, out, err = _generate(capsys, str(path), "--prompt", "x")
    assert status == 2 and out == "" and "Traceback" not in err
    assert needle in err and "Fix:" in err


@pytest.mark.parametrize(("options", "needle"), [
    (["--prompt", ""], "the prompt is empty"),
    (["--temperature", "-1"], "--temperature -1.0 is not a temperature"),
    (["--top_p", "1.5"], "--top_p 1.5 is outside (0, 1]"),
    (["--top_k", "0"], "--top_k 0 keeps no token"),
    (["--max_new_tokens", "0"], "--max_new_tokens 0 asks for no text"),
    (["--temperature", "0", "--num_samples", "2"], "greedy decoding gives the same text every time"),
    (["--temperature", "0", "--top_k", "5"], "--top_k has no effect with --temperature 0"),
    (["--device", "tpu:x"], "--device tpu:x"),
])
def test_bad_option_values_are_user_errors(options, needle, model_dir, capsys):
    args = [str(model_dir), *options] if "--prompt" in options else [str(model_dir), "--prompt", "x", *options]
    status, out, err = _generate(capsys, *args)
    assert status == 2 and out == "" and "Traceback" not in err
    assert needle in err and "Fix:" in err


def test_no_prompt_and_a_terminal_on_stdin_is_a_user_error(model_dir, monkeypatch, capsys):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stdin", Terminal())
    status, _, err = _generate(capsys, str(model_dir))
    assert status == 2 and "no prompt" in err and "--prompt TEXT" in err
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n"))  # piped, but nothing in it
    assert _generate(capsys, str(model_dir))[0] == 2
