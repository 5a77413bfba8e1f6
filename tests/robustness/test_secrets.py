"""Secrets never reach what Ava writes or prints: config.yaml, summary.json, W&B's config, error messages.

The unit tests pin which names count as secret and how values are masked; the
end-to-end tests run the real CLI with a fake W&B key in its environment (and
in a netrc file, where `wandb login` keeps it) and that same key typed into a
config, and check the key appears in no output.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from ava.config import ConfigError, ConfigFiles, WorldSize, load_config
from ava.config.errors import Problem
from ava.errors import UserError
from ava.secrets import MASK, is_secret_name, redact, redact_text, secret_values

REPO = Path(__file__).resolve().parents[2]
TINY = "configs/gpu/tiny.yaml"
CPU = "configs/hardware/cpu.yaml"
KEY = "ava-test-fake-wandb-key-7f3a9c1e"  # what a user would paste from wandb.ai/authorize
NETRC_KEY = "ava-test-fake-netrc-key-52b8d04a"
GIT_HASH = "0123456789abcdef0123456789abcdef01234567"  # versions.json records these; they are not secrets


def _netrc(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o600)
    return path


@pytest.fixture
def key_in_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    """WANDB_API_KEY=KEY for this process, and no netrc of the machine's user."""
    monkeypatch.setenv("WANDB_API_KEY", KEY)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    return KEY


# ---------------------------------------------------------------- which names are secret


@pytest.mark.parametrize("name", [
    "WANDB_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "GITHUB_TOKEN", "OPENAI_API_KEY", "APIKEY",
    "DB_PASSWORD", "MYSQL_PASSWD", "AWS_SECRET_ACCESS_KEY", "GOOGLE_APPLICATION_CREDENTIALS",
    "api_key", "wandb_api_key", "token", "access_token", "password", "secret", "client_secret", "private_key",
    "wandbApiKey", "hf-token"])
def test_names_that_hold_secrets_are_recognised(name):
    assert is_secret_name(name)


@pytest.mark.parametrize("name", [
    "TOKENIZERS_PARALLELISM", "AVA_MAX_TOKENS", "max_new_tokens", "num_experts_per_token", "pad_token",
    "eos_token", "num_key_value_heads", "tokenizer_name", "KEY", "sort_key", "PWD", "PATH", "WANDB_PROJECT",
    "WANDB_ENTITY", "run_name"])
def test_ordinary_names_that_merely_contain_token_or_key_are_not_secret(name):
    assert not is_secret_name(name)


def test_secret_values_takes_long_values_of_secret_variables_longest_first(tmp_path):
    env = {"WANDB_API_KEY": KEY, "HF_TOKEN": "hf_" + "x" * 40, "DB_PASSWORD": "short",
           "TOKENIZERS_PARALLELISM": "false-but-long-enough", "AVA_RUN": "not-a-secret-value"}
    assert secret_values(env, tmp_path / "missing") == ["hf_" + "x" * 40, KEY]


# ---------------------------------------------------------------- the W&B key in ~/.netrc


def test_the_wandb_password_in_netrc_is_a_secret_and_other_machines_are_not(tmp_path):
    path = _netrc(tmp_path / "netrc", f"machine api.wandb.ai\n  login user\n  password {NETRC_KEY}\n"
                                      "machine example.com login me password other-site-password\n")
    assert secret_values({}, path) == [NETRC_KEY]


def test_netrc_is_found_through_the_NETRC_variable_and_a_self_hosted_wandb_host(tmp_path):
    path = _netrc(tmp_path / "netrc", f"machine wandb.corp.example login user password {NETRC_KEY}\n")
    env = {"NETRC": str(path), "WANDB_BASE_URL": "https://wandb.corp.example:8080"}
    assert secret_values(env) == [NETRC_KEY]


@pytest.mark.parametrize("content", [None, "machine api.wandb.ai login\n  password", b"\xff\xfe\x00 binary"])
def test_a_missing_or_malformed_netrc_means_no_secret_from_it(tmp_path, content):
    path = tmp_path / "netrc"
    if isinstance(content, str):
        _netrc(path, content)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    assert secret_values({"WANDB_API_KEY": KEY}, path) == [KEY]


# ---------------------------------------------------------------- masking


def test_redact_text_masks_every_occurrence_and_the_longest_secret_whole():
    text = f"key={KEY} again {KEY}x and {KEY}-extended"
    assert redact_text(text, [KEY, KEY + "-extended"]) == f"key={MASK} again {MASK}x and {MASK}"


def test_redact_masks_nested_values_and_secret_named_keys_and_keeps_other_values():
    data = {"training": {"run_name": f"run-{KEY}", "tags": [KEY, ("a", KEY)], "steps": 10, "lr": 1e-3,
                         "resume": None, "enabled": True},
            "api_key": "typed-into-the-config", "hf_token": "", "token": 7,
            "versions": {"ava": GIT_HASH, "deepspeed": "0.16.4"},
            KEY: "a key used as a name"}
    out = redact(data, [KEY])
    assert out == {"training": {"run_name": f"run-{MASK}", "tags": [MASK, ("a", MASK)], "steps": 10, "lr": 1e-3,
                                "resume": None, "enabled": True},
                   "api_key": MASK, "hf_token": "", "token": 7,
                   "versions": {"ava": GIT_HASH, "deepspeed": "0.16.4"},
                   MASK: "a key used as a name"}
    assert data["training"]["run_name"] == f"run-{KEY}", "the input is not modified"


def test_the_rendered_config_masks_a_key_typed_into_it(key_in_env, tmp_path):
    from ava.config.render import explain, render_yaml

    layer = tmp_path / "mine.yaml"
    layer.write_text(f"training:\n  run_name: {KEY}\n")
    resolved = load_config(ConfigFiles(TINY, CPU, str(layer)), (f"--wandb_entity={KEY}",), WorldSize(1, "test"))
    for text in (render_yaml(resolved, with_origins=True), render_yaml(resolved, with_origins=False),
                 explain(resolved, ("training", "wandb_entity"))):
        assert KEY not in text and MASK in text


def test_a_failed_runs_summary_json_masks_a_key_quoted_by_its_exception(key_in_env, tmp_path):
    from ava.train.run_dir import record_failure as _record_failure

    _record_failure(tmp_path, RuntimeError(f"401 Unauthorized for api key {KEY}"), 0.0, None)
    text = (tmp_path / "summary.json").read_text()
    assert KEY not in text and json.loads(text)["error"] == f"RuntimeError: 401 Unauthorized for api key {MASK}"


def test_the_config_and_run_name_sent_to_wandb_are_masked(key_in_env, tmp_path, monkeypatch):
    from ava.train.report.wandb_log import WandbLogger

    sent: dict = {}

    def init(**kwargs):
        sent.update(kwargs)
        return types.SimpleNamespace(disabled=False)

    fake = types.SimpleNamespace(setup=lambda: types.SimpleNamespace(settings=types.SimpleNamespace(mode="offline")),
                                 login=lambda **kwargs: True, init=init, Settings=lambda **kwargs: kwargs)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    config = {"training": {"run_name": KEY, "wandb_api_key": "pasted-here-by-mistake"}}
    assert WandbLogger.start(config, "ava", None, f"run-{KEY}", tmp_path) is not None
    assert sent["config"] == {"training": {"run_name": MASK, "wandb_api_key": MASK}}
    assert sent["name"] == f"run-{MASK}"


@pytest.mark.parametrize("error", [
    ConfigError([Problem("command line (--run_name)", "training.run_name", "too long", value=KEY)]),
    UserError(f"cannot open {KEY}", "check it")])
def test_launched_entry_points_print_user_errors_with_secrets_masked(key_in_env, capsys, error):
    from ava.cli.main import _entry

    def command(argv):
        raise error

    assert _entry(command, []) == 2
    err = capsys.readouterr().err
    assert KEY not in err and MASK in err


# ---------------------------------------------------------------- the real CLI


def _run_cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`python -m ava ARGS` with WANDB_API_KEY=KEY and a netrc holding NETRC_KEY for api.wandb.ai."""
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    netrc = _netrc(tmp_path / "netrc", f"machine api.wandb.ai login user password {NETRC_KEY}\n")
    env.update(WANDB_API_KEY=KEY, NETRC=str(netrc), PYTHONDONTWRITEBYTECODE="1")
    return subprocess.run([sys.executable, "-m", "ava", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)


def test_config_show_never_prints_the_wandb_key_typed_into_a_config(tmp_path):
    layer = tmp_path / "mine.yaml"
    layer.write_text(f"training:\n  run_name: {KEY}\n  wandb_entity: {NETRC_KEY}\n")
    result = _run_cli(tmp_path, "config", "show", "--explain", "--config", TINY, "--hardware_config", CPU,
                      "--distributed_config", str(layer), "--wandb_project", f"p-{KEY}")
    shown = result.stdout + result.stderr
    assert result.returncode == 0, shown
    assert KEY not in shown and NETRC_KEY not in shown
    assert f"run_name: '{MASK}'" in result.stdout and f"wandb_entity: '{MASK}'" in result.stdout
    assert f"wandb_project: p-{MASK}" in result.stdout  # and its origin, which quotes the command line:
    assert f"# command line (--wandb_project p-{MASK})" in result.stdout


def test_a_user_error_that_quotes_the_key_prints_it_masked(tmp_path):
    layer = tmp_path / "mine.yaml"
    layer.write_text(f"training:\n  batch_size: {KEY}\n")
    result = _run_cli(tmp_path, "config", "validate", "--config", TINY, "--hardware_config", CPU,
                      "--distributed_config", str(layer), "--router_type", NETRC_KEY)
    shown = result.stdout + result.stderr
    assert result.returncode == 2 and "Traceback" not in shown, shown
    assert KEY not in shown and NETRC_KEY not in shown
    assert f"training.batch_size = '{MASK}'" in result.stderr and f"model.router_type = '{MASK}'" in result.stderr


def test_config_diff_masks_a_key_that_differs_between_the_two_configs(tmp_path):
    layer = tmp_path / "mine.yaml"
    layer.write_text(f"training:\n  wandb_entity: {KEY}\n")
    result = _run_cli(tmp_path, "config", "diff", TINY, str(layer), "--hardware_config", CPU)
    shown = result.stdout + result.stderr
    assert result.returncode == 0 and KEY not in shown, shown
    assert "training.wandb_entity" in result.stdout and MASK in result.stdout, shown
