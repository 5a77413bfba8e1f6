"""Bad inputs to the real CLI: every user error is exit status 2, no traceback, and a useful message.

Each case runs `python -m ava ...` (or `python train.py ...`) in a subprocess
from the repository root and checks the contract for user errors:

* the exit status is 2;
* "Traceback" appears in neither stdout nor stderr, and stdout stays empty;
* stderr names where the problem is (`file:LINE`, or `command line (--flag)`),
  the offending key, and contains "Fix:" followed by a concrete fix
  (a "did you mean" suggestion, "remove the quotes", the nearest valid values...).

YAML files are written under pytest's tmp_path; `{cfg}` in a case stands for
the path of the case's main YAML file and `{tmp}` for its directory.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TINY = "configs/gpu/tiny.yaml"
CPU = "configs/hardware/cpu.yaml"
VALIDATE = ("config", "validate", "--config", "{cfg}")
VALIDATE_TINY = ("config", "validate", "--config", TINY)
TIMEOUT_S = 120

# Launcher variables would change the world size or silence non-zero ranks.
_LAUNCHER_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_ENV}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def run_cli(*args: str, script: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run `python -m ava ARGS` (or `python SCRIPT ARGS`) from the repository root."""
    head = [sys.executable, script] if script else [sys.executable, "-m", "ava"]
    return subprocess.run([*head, *args], cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=TIMEOUT_S)


def numbered_items(stderr: str) -> list[int]:
    """The numbers of the `  N. ...` problem lines of a rendered ConfigError."""
    return [int(n) for n in re.findall(r"^  (\d+)\. ", stderr, flags=re.MULTILINE)]


def assert_user_error(result: subprocess.CompletedProcess[str], *needles: str,
                      problems: int | None = None, fix: bool = True) -> None:
    """The user-error contract, plus the case's own expected fragments of stderr."""
    out, err = result.stdout, result.stderr
    shown = f"\n--- exit {result.returncode}\n--- stdout:\n{out}\n--- stderr:\n{err}"
    assert result.returncode == 2, "expected exit status 2" + shown
    assert "Traceback" not in out and "Traceback" not in err, "a traceback was printed" + shown
    assert out == "", "a user error must print nothing on stdout" + shown
    if fix:
        assert "Fix:" in err, "the message gives no fix" + shown
    for needle in needles:
        assert needle in err, f"missing from stderr: {needle!r}" + shown
    if problems is not None:
        plural = "problem" if problems == 1 else "problems"
        assert f"configuration error: {problems} {plural} found" in err, shown
        assert numbered_items(err) == list(range(1, problems + 1)), shown


@dataclass(frozen=True)
class Case:
    id: str
    expect: tuple[str, ...]  # fragments of stderr; may contain {cfg} and {tmp}
    yaml: str | bytes | None = None  # written to {cfg} = tmp_path / "cfg.yaml"
    argv: tuple[str, ...] = VALIDATE  # may contain {cfg} and {tmp}
    files: dict[str, str] = field(default_factory=dict)  # other files under {tmp}
    problems: int | None = 1


CASES: list[Case] = [
    # ---------------------------------------------------------------- YAML syntax
    Case("yaml-tab-indentation", yaml="model:\n\thidden_size: 8\n", expect=(
        "{cfg}:2:1: YAML syntax error", "'\\t'", "in line `hidden_size: 8`",
        "Fix: YAML indentation must use spaces, not tabs")),
    Case("yaml-indented-too-deep", yaml="model:\n  hidden_size: 8\n   num_layers: 2\n", expect=(
        "{cfg}:3:", "YAML syntax error: mapping values are not allowed here", "in line `num_layers: 2`",
        "Fix:", "check the indentation")),
    Case("yaml-dedented-sibling", yaml="model:\n    hidden_size: 8\n  num_layers: 2\n", expect=(
        "{cfg}:3:", "expected <block end>", "in line `num_layers: 2`",
        "Fix: the indentation of this line does not match its siblings")),
    Case("yaml-duplicate-key", yaml="model:\n  hidden_size: 8\n  num_layers: 2\n  hidden_size: 16\n", expect=(
        "{cfg}:4: model.hidden_size: duplicate key", "also set on line 2 of the same mapping",
        "Fix: delete one of the two lines")),
    Case("yaml-duplicate-section", yaml="model:\n  hidden_size: 8\nmodel:\n  num_layers: 2\n", expect=(
        "{cfg}:3: model: duplicate key: 'model' is also set on line 1",)),
    Case("yaml-unclosed-bracket", yaml="model:\n  hidden_size: [8, 16\ntraining:\n  batch_size: 2\n", expect=(
        "{cfg}:3:", "while parsing a flow sequence", "expected ',' or ']'",
        "Fix:", "unbalanced quotes or brackets")),
    Case("yaml-top-level-list", yaml="- model\n- training\n", expect=(
        "{cfg}:1: the top level of a config file must be a mapping of sections",
        "Fix: start the file with a section name followed by a colon")),
    Case("yaml-non-string-key", yaml="model:\n  1: 2\n", expect=(
        "{cfg}:2: model: key 1 is not a string", "Fix: config keys are names such as `hidden_size`")),
    Case("yaml-section-is-scalar", yaml="model: 5\n", expect=(
        "{cfg}:1: model = 5: 'model' must be a mapping of keys", "Fix: write `model:` followed by indented")),
    Case("yaml-not-utf8", yaml=b"model:\n  hidden_size: \xff\xfe\n", expect=(
        "{cfg}: cannot read the --config file", "Fix:", "UTF-8 text")),
    # ---------------------------------------------------------------- files
    Case("missing-config-suggests-close-name", files={"tiny.yaml": "model: {}\n", "notes.txt": ""},
         argv=("config", "validate", "--config", "{tmp}/tinny.yaml"), expect=(
             "{tmp}/tinny.yaml: the --config file does not exist",
             "Fix: did you mean {tmp}/tiny.yaml?")),
    Case("missing-config-lists-available-files", files={"tiny.yaml": "model: {}\n"},
         argv=("config", "validate", "--config", "{tmp}/completely_different_name.yaml"), expect=(
             "{tmp}/completely_different_name.yaml: the --config file does not exist",
             "Fix: files available in {tmp}: tiny.yaml")),
    Case("missing-hardware-config-wrong-extension",
         argv=("config", "validate", "--config", TINY, "--hardware_config", "configs/hardware/cpu.yml"), expect=(
             "configs/hardware/cpu.yml: the --hardware_config file does not exist",
             "Fix: did you mean configs/hardware/cpu.yaml")),
    Case("config-is-a-directory", argv=("config", "validate", "--config", "configs/gpu"), expect=(
        "configs/gpu: the --config path is a directory, not a YAML file",
        "Fix: pass the path of a .yaml file inside it")),
    # ---------------------------------------------------------------- unknown keys
    Case("misspelt-section-depth1", yaml="trainig:\n  batch_size: 8\n", expect=(
        "{cfg}:1: trainig: unknown section 'trainig' in the top level", "Fix: did you mean 'training'?")),
    Case("misspelt-key-depth2", yaml="model:\n  hiden_size: 8\n", expect=(
        "{cfg}:2: model.hiden_size: unknown key 'hiden_size' in model", "Fix: did you mean 'hidden_size'?")),
    Case("misspelt-key-depth3", yaml="training:\n  gradient_health:\n    enabld: true\n", expect=(
        "{cfg}:3: training.gradient_health.enabld: unknown key 'enabld' in training.gradient_health",
        "Fix: did you mean 'enabled'?")),
    Case("key-in-wrong-section", yaml="training:\n  hidden_size: 8\n", expect=(
        "{cfg}:2: training.hidden_size: unknown key 'hidden_size' in training",
        "Fix: 'hidden_size' belongs under model: (full key model.hidden_size)")),
    Case("unknown-key-no-close-match", yaml="model:\n  zzz_qqq: 1\n", expect=(
        "{cfg}:2: model.zzz_qqq: unknown key 'zzz_qqq' in model",
        "Fix: remove it; the keys allowed in model are: hidden_size, num_layers")),
    # ---------------------------------------------------------------- wrong types
    Case("quoted-int", yaml='model:\n  hidden_size: "8"\n', expect=(
        "{cfg}:2: model.hidden_size = '8': expected a whole number, got str",
        "Fix: remove the quotes: write 8")),
    Case("quoted-exponent-float", yaml='training:\n  learning_rate: "5e-5"\n', expect=(
        "{cfg}:2: training.learning_rate = '5e-5': expected a number, got str",
        "Fix: remove the quotes: write 5e-5")),
    Case("string-for-bool", yaml="training:\n  gradient_checkpointing: yes please\n", expect=(
        "{cfg}:2: training.gradient_checkpointing = 'yes please': expected true or false, got str",
        "Fix: write true or false (without quotes)")),
    Case("quoted-bool", yaml='training:\n  gradient_checkpointing: "true"\n', expect=(
        "{cfg}:2: training.gradient_checkpointing = 'true'", "Fix: remove the quotes: write true")),
    Case("list-for-int", yaml="model:\n  num_layers: [2, 4]\n", expect=(
        "{cfg}:2: model.num_layers = [2, 4]: expected a whole number, got list",
        "Fix: give a whole number from 1 to 16,384 (Number of transformer blocks)")),
    Case("float-for-int", yaml="training:\n  batch_size: 8.0\n", expect=(
        "{cfg}:2: training.batch_size = 8.0: expected a whole number, got float", "Fix: give a whole number")),
    Case("scalar-for-subsection", yaml="training:\n  gradient_health: 5\n", expect=(
        "{cfg}:2: training.gradient_health = 5: 'gradient_health' must be a mapping of keys",
        "Fix: write `gradient_health:` followed by indented key: value lines; keys: enabled,")),
    # ---------------------------------------------------------------- ranges and allowed values
    Case("negative-learning-rate", yaml="training:\n  learning_rate: -1e-4\n", expect=(
        "{cfg}:2: training.learning_rate = -0.0001: must be greater than 0",
        "Fix: choose a value greater than 0 and at most 1: Peak learning rate")),
    Case("dropout-above-one", yaml="model:\n  hidden_dropout: 1.5\n", expect=(
        "{cfg}:2: model.hidden_dropout = 1.5: must be less than 1", "Fix: choose a value at least 0 and less than 1")),
    # Every number has an upper bound (ava.config.schema.base): past it is a config error, not a crash in torch.
    Case("int-too-large-for-any-tensor", yaml="model:\n  hidden_size: 100000000000000000000000\n", expect=(
        "{cfg}:2: model.hidden_size = 100000000000000000000000: must be at most 2^20 (1,048,576)",
        "Fix: choose a value from 1 to 2^20 (1,048,576): Width of the residual stream")),
    Case("cli-max-steps-beyond-2-53", argv=(*VALIDATE_TINY, "--max_steps", "99999999999999999999"), expect=(
        "command line (--max_steps 99999999999999999999): training.max_steps = 99999999999999999999: "
        "must be at most 2^53 (9,007,199,254,740,992)",
        "Fix: choose a value from 1 to 2^53 (9,007,199,254,740,992)")),
    Case("float-above-its-bound", yaml="training:\n  learning_rate: 3.0\n", expect=(
        "{cfg}:2: training.learning_rate = 3.0: must be at most 1",
        "Fix: choose a value greater than 0 and at most 1: Peak learning rate")),
    Case("seed-beyond-32-bits", yaml="data:\n  shuffle_seed: 10000000000\n", expect=(
        "{cfg}:2: data.shuffle_seed = 10000000000: must be at most 2^32 - 1 (4,294,967,295)",
        "Fix: choose a value from 0 to 2^32 - 1 (4,294,967,295)")),
    Case("bucket-size-in-float-notation-too-large", yaml="deepspeed:\n  reduce_bucket_size: 1e15\n", expect=(
        "{cfg}:2: deepspeed.reduce_bucket_size = 1000000000000000: must be at most 2^40 (1,099,511,627,776)",
        "Fix: choose a value from 0 to 2^40")),
    # The line is the list's (list items have none of their own in the provenance).
    Case("list-item-above-its-bound",
         yaml="data:\n  sources:\n    - path: a.txt\n      weight: 1\n    - path: b.txt\n      weight: 1e20\n",
         expect=("{cfg}:2: data.sources[1].weight = 1e+20: must be at most 1e15",
                 "Fix: choose a value greater than 0 and at most 1e15: Mixing weight")),
    Case("rlhf-key-above-its-bound", yaml="rlhf:\n  generation:\n    temperature: 1e9\n",
         argv=(*VALIDATE_TINY, "--rlhf_config", "{cfg}"), expect=(
             "{cfg}:3: rlhf.generation.temperature = 1000000000.0: must be at most 1,000",
             "Fix: choose a value greater than 0 and at most 1,000: Sampling temperature")),
    # `nan` and `inf` are text in YAML, `.nan` and `.inf` floats: neither is a number a key can use.
    Case("nan-string-for-float", yaml="training:\n  learning_rate: nan\n", expect=(
        "{cfg}:2: training.learning_rate = 'nan': nan is not a valid number here: this key takes a finite number",
        "Fix: choose a value greater than 0 and at most 1: Peak learning rate")),
    Case("cli-inf-string-for-int", argv=(*VALIDATE_TINY, "--num_layers", "inf"), expect=(
        "command line (--num_layers inf): model.num_layers = 'inf': inf is not a valid number here",
        "Fix: choose a value from 1 to 16,384: Number of transformer blocks")),
    Case("yaml-nan-float", yaml="model:\n  layer_norm_eps: .nan\n", expect=(
        "{cfg}:2: model.layer_norm_eps = .nan: must be a finite number, not .nan",
        "Fix: choose a value greater than 0 and at most 1: Epsilon of the normalisation layers")),
    Case("yaml-inf-float", yaml="training:\n  max_gradient_norm: .inf\n", expect=(
        "{cfg}:2: training.max_gradient_norm = .inf: must be a finite number, not .inf",
        "Fix: choose a value from 0 to 1e6: Global gradient-norm clip")),
    Case("cli-negative-inf-float", argv=(*VALIDATE_TINY, "--training.gradient_health.final_clip_value=-.inf"),
         expect=("training.gradient_health.final_clip_value = -.inf: must be a finite number, not -.inf",
                 "Fix: choose a value greater than 0 and at most 1e6")),
    Case("betas-wrong-length", yaml="deepspeed:\n  optimizer:\n    params:\n      betas: [0.9]\n", expect=(
        "{cfg}:4: deepspeed.optimizer.params.betas = [0.9]: must have exactly 2 values",
        "Fix: write e.g. [0.9, 0.95]")),
    Case("literal-misspelt-router", yaml="model:\n  router_type: topp\n", expect=(
        "{cfg}:2: model.router_type = 'topp': not an allowed value; allowed: 'topk', 'switch', 'aux_loss_free'",
        "Fix: did you mean 'topk'?")),
    Case("literal-zero-stage-out-of-set", yaml="deepspeed:\n  zero_stage: 7\n", expect=(
        "{cfg}:2: deepspeed.zero_stage = 7: not an allowed value; allowed: 0, 1, 2, 3",
        "Fix: use one of 0, 1, 2, 3")),
    # ---------------------------------------------------------------- rules across keys
    Case("hidden-size-not-divisible-by-heads",
         yaml="model:\n  hidden_size: 100\n  num_attention_heads: 3\n", expect=(
             "{cfg}:2: model.hidden_size = 100: must be divisible by model.num_attention_heads = 3 ({cfg}:3)",
             "Fix: use num_attention_heads 2 or 4, or hidden_size 102")),
    Case("experts-per-token-above-experts",
         yaml="model:\n  num_experts: 4\n  num_experts_per_token: 6\n", expect=(
             "{cfg}:3: model.num_experts_per_token = 6: a token cannot be routed to more experts than exist: "
             "model.num_experts = 4 ({cfg}:2)", "Fix: set num_experts_per_token <= 4")),
    Case("switch-router-top2",
         yaml="model:\n  num_experts: 4\n  num_experts_per_token: 2\n  router_type: switch\n", expect=(
             "{cfg}:4: model.router_type = 'switch': switch routing sends each token to exactly one expert",
             "model.num_experts_per_token = 2 ({cfg}:3)",
             "Fix: use router_type: topk for top-2 routing, or set num_experts_per_token: 1")),
    Case("warmup-not-below-max-steps", yaml="training:\n  max_steps: 100\n  warmup_steps: 100\n", expect=(
        "{cfg}:3: training.warmup_steps = 100: must be smaller than training.max_steps = 100 ({cfg}:2)",
        "Fix: set warmup_steps to at most 99 (10% of max_steps, 10, is typical)")),
    # Any warmup below max_steps is valid: the fix names the largest (it said "at most 1" for max_steps 10).
    Case("warmup-equal-to-a-short-max-steps", yaml="training:\n  max_steps: 10\n  warmup_steps: 10\n", expect=(
        "Fix: set warmup_steps to at most 9 (10% of max_steps, 1, is typical)",)),
    Case("cli-warmup-equal-to-max-steps", argv=(*VALIDATE_TINY, "--max_steps", "10", "--warmup_steps", "10"), expect=(
        "command line (--warmup_steps 10): training.warmup_steps = 10: must be smaller than training.max_steps = 10",
        "Fix: set warmup_steps to at most 9")),
    # An empty file (or only comments) would train the schema's defaults, a 1.95B-parameter model.
    Case("empty-config-file", yaml="", expect=("{cfg}: the --config file sets nothing", "Fix:")),
    Case("comments-only-config-file", yaml="# model: set later\n", expect=("{cfg}: the --config file sets nothing",)),
    # argparse keeps the last of a repeated flag: the first file would be dropped without a word.
    Case("config-given-twice", yaml="training:\n  max_steps: 5\n", argv=("config", "validate", "--config", TINY,
                                                                       "--config", "{cfg}"),
         expect=("--config given twice (configs/gpu/tiny.yaml and {cfg})", "Fix: pass --config once"), problems=None),
    Case("lr-end-above-learning-rate", yaml="training:\n  learning_rate: 1e-4\n  lr_end: 1e-3\n", expect=(
        "{cfg}:3: training.lr_end = 0.001: must not exceed training.learning_rate = 0.0001 ({cfg}:2)",
        "Fix: set lr_end to at most 0.0001")),
    Case("max-length-above-positions",
         yaml="model:\n  max_position_embeddings: 256\ndata:\n  max_length: 512\n", expect=(
             "{cfg}:4: data.max_length = 512: exceeds model.max_position_embeddings = 256 ({cfg}:2)",
             "Fix: set data.max_length <= 256")),
    Case("moh-without-routed-heads",
         yaml="model:\n  num_attention_heads: 4\n  use_moh: true\n  moh:\n    num_shared_heads: 4\n", expect=(
             "{cfg}:5: model.moh.num_shared_heads = 4: leaves no head to route: model.num_attention_heads = 4 "
             "({cfg}:2)",
             "Fix: set num_shared_heads below 4")),
    Case("inconsistent-batch-sizes-one-file",
         yaml="training:\n  batch_size: 8\n  gradient_accumulation_steps: 4\ndeepspeed:\n  train_batch_size: 100\n",
         expect=(
             "{cfg}:5: batch size: inconsistent batch sizes",
             "deepspeed.train_batch_size = 100 ({cfg}:5)",
             "training.batch_size = 8 ({cfg}:2)",
             "training.gradient_accumulation_steps = 4 ({cfg}:3)",
             "= 32",
             "Fix: use one of the nearest valid combinations",
             "micro 25 x accumulation 4 x 1 rank(s) = global 100",
             "or remove deepspeed.train_batch_size")),
    Case("alias-keys-disagree-in-one-file",
         yaml="training:\n  batch_size: 8\ndeepspeed:\n  micro_batch_size: 4\n", expect=(
             "{cfg}:2: training.batch_size: the same setting is given twice with different values in one layer",
             "training.batch_size = 8 ({cfg}:2)", "deepspeed.micro_batch_size = 4 ({cfg}:4)",
             "alternative names for one value", "Fix: keep only one of them, or give them the same value")),
    Case("fp16-on-cpu-hardware-from-cli",
         argv=("config", "validate", "--config", TINY, "--hardware_config", CPU, "--mixed_precision", "fp16"),
         expect=(
             "command line (--mixed_precision fp16): training.mixed_precision = 'fp16': "
             f"fp16 is not supported by hardware 'CPU' ({CPU}:3)",
             "AMX-FP16", "Fix: use mixed_precision: bf16 (or fp32)")),
    Case("fp16-on-cpu-hardware-from-file", yaml="training:\n  mixed_precision: fp16\n",
         argv=("config", "validate", "--config", TINY, "--hardware_config", CPU, "--distributed_config", "{cfg}"),
         expect=(
             "{cfg}:2: training.mixed_precision = 'fp16': fp16 is not supported by hardware 'CPU'",
             "Fix: use mixed_precision: bf16")),
    Case("distributed-global-batch-no-accumulation-fits-the-files-micro-batch",
         yaml="deepspeed:\n  train_batch_size: 1001\n",
         argv=("config", "validate", "--config", TINY, "--hardware_config", CPU, "--distributed_config", "{cfg}"),
         expect=(
             "{cfg}:2: batch size: inconsistent batch sizes: the global batch deepspeed.train_batch_size = 1001",
             "micro 7 x accumulation 143 x 1 rank(s) = global 1001")),  # never micro 1001 (the file says 8)
    Case("nvme-offload-without-stage3",
         yaml="deepspeed:\n  zero_stage: 2\n  nvme_offload: true\n  nvme_path: /local_nvme\n", expect=(
             "{cfg}:3: deepspeed.nvme_offload = true: NVMe offload (ZeRO-Infinity) needs zero_stage 3, not 2 ({cfg}:2)",
             "Fix: set deepspeed.zero_stage: 3")),
    Case("cpu-offload-with-stage0", yaml="deepspeed:\n  zero_stage: 0\n  cpu_offload: true\n", expect=(
        "{cfg}:3: deepspeed.cpu_offload = true: CPU offload needs ZeRO stage 1, 2 or 3",
        "Fix: set deepspeed.zero_stage: 2 (or 3)")),
    # ---------------------------------------------------------------- command-line overrides
    Case("cli-unknown-flag-suggests", argv=(*VALIDATE_TINY, "--hiden_size", "3"), expect=(
        "command line (--hiden_size 3): hiden_size: unknown option --hiden_size",
        "Fix: did you mean --hidden_size")),
    Case("cli-ambiguous-flat-flag", argv=(*VALIDATE_TINY, "--train_batch_size", "4"), expect=(
        "command line (--train_batch_size 4): train_batch_size: the flat flag --train_batch_size is ambiguous",
        "it could mean --data.train_batch_size (", "and --deepspeed.train_batch_size (",
        "Fix: use the dotted form of the one you mean: --data.train_batch_size or --deepspeed.train_batch_size")),
    Case("cli-unknown-dotted-key", argv=(*VALIDATE_TINY, "--model.hiden_size", "3"), expect=(
        "command line (--model.hiden_size 3): model.hiden_size: unknown key 'hiden_size' in section 'model'",
        "Fix: did you mean --model.hidden_size?")),
    Case("cli-unknown-dotted-key-depth3", argv=(*VALIDATE_TINY, "--training.gradient_health.enabld=1"), expect=(
        "command line (--training.gradient_health.enabld=1): training.gradient_health.enabld: unknown key 'enabld'",
        "Fix: did you mean --training.gradient_health.enabled?")),
    Case("cli-unknown-dotted-section", argv=(*VALIDATE_TINY, "--modle.hidden_size", "8"), expect=(
        "command line (--modle.hidden_size 8): modle.hidden_size: unknown key 'modle'",
        "Fix: did you mean --model.hidden_size?")),
    Case("cli-flag-missing-value", argv=(*VALIDATE_TINY, "--learning_rate", "--batch_size", "4"), expect=(
        "command line (--learning_rate): training.learning_rate: the flag has no value",
        "Fix: write `--learning_rate VALUE` (float)")),
    Case("cli-dotted-flag-missing-value-at-end", argv=(*VALIDATE_TINY, "--training.batch_size"), expect=(
        "command line (--training.batch_size): training.batch_size: the flag has no value",
        "Fix: write `--training.batch_size VALUE` (int)")),
    Case("cli-section-given-a-value", argv=(*VALIDATE_TINY, "--model", "3"), expect=(
        "command line (--model 3): model: 'model' is a section, not a single value",
        "Fix: set one of its keys, e.g. --model.hidden_size VALUE")),
    Case("cli-nested-key-needs-dotted-name", argv=(*VALIDATE_TINY, "--initial_clip_value", "1"), expect=(
        "command line (--initial_clip_value 1): initial_clip_value: there is no top-level setting",
        "Fix: use the full dotted name: --training.gradient_health.initial_clip_value")),
    Case("cli-wrong-type", argv=(*VALIDATE_TINY, "--warmup_steps", "abc"), expect=(
        "command line (--warmup_steps abc): training.warmup_steps = 'abc': expected a whole number, got str",
        "Fix: give a whole number")),
    Case("cli-out-of-range", argv=(*VALIDATE_TINY, "--batch_size=0"), expect=(
        "command line (--batch_size=0): training.batch_size = 0: must be greater than 0",
        "Fix: choose a value from 1 to 2^16 (65,536): Per-device micro batch")),
    Case("cli-stray-positional", argv=(*VALIDATE_TINY, "stray"), expect=(
        "command line: unexpected argument 'stray'",
        "Fix: overrides are written `--key value` or `--section.key=value`")),
    # ---------------------------------------------------------------- ava config explain
    Case("explain-unknown-key", argv=("config", "explain", "hiden_size", "--config", TINY), expect=(
        "command line: hiden_size: unknown key", "Fix: did you mean hidden_size")),
    Case("explain-misspelt-dotted-key", argv=("config", "explain", "trainig.batch_size", "--config", TINY), expect=(
        "command line: trainig.batch_size: unknown key", "Fix: did you mean training.batch_size")),
    Case("explain-ambiguous-key", argv=("config", "explain", "train_batch_size", "--config", TINY), expect=(
        "command line: train_batch_size: ambiguous key name: it could mean training.batch_size or "
        "deepspeed.train_batch_size", "Fix: give the dotted name")),
]

assert len({c.id for c in CASES}) == len(CASES), "case ids must be unique"


def _materialise(case: Case, tmp_path: Path) -> tuple[list[str], list[str]]:
    cfg = tmp_path / "cfg.yaml"
    if isinstance(case.yaml, bytes):
        cfg.write_bytes(case.yaml)
    elif case.yaml is not None:
        cfg.write_text(case.yaml, encoding="utf-8")
    for name, text in case.files.items():
        (tmp_path / name).write_text(text, encoding="utf-8")

    def fill(s: str) -> str:
        return s.replace("{cfg}", str(cfg)).replace("{tmp}", str(tmp_path))

    return [fill(a) for a in case.argv], [fill(e) for e in case.expect]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, tmp_path: Path) -> None:
    argv, expect = _materialise(case, tmp_path)
    assert_user_error(run_cli(*argv), *expect, problems=case.problems)


# -------------------------------------------------------------------- unknown commands

@pytest.mark.parametrize("argv, expect", [
    (("config", "frobnicate"), ("unknown command `config frobnicate`", "Did you mean `ava config ")),
    (("config", "valdate", "--config", TINY), ("unknown command `config valdate`",
                                               "Did you mean `ava config validate`?")),
    (("trian",), ("unknown command `trian`", "Did you mean `ava train`?")),
], ids=["config-frobnicate", "config-valdate", "trian"])
def test_unknown_command(argv: tuple[str, ...], expect: tuple[str, ...]) -> None:
    assert_user_error(run_cli(*argv), *expect, "Run `ava --help` for the list")


def test_unknown_command_message_has_fix() -> None:
    assert_user_error(run_cli("config", "frobnicate"), "config frobnicate")
    assert_user_error(run_cli("modle", "summary"), "Fix: run `ava model`")
    assert_user_error(run_cli("qqqq"), "Fix: pick one of: `ava train`, `ava rlhf`, `ava config`, `ava model`")


# -------------------------------------------------------------------- several problems at once

def test_problems_in_every_section_are_reported_in_one_run(tmp_path: Path) -> None:
    cfg = tmp_path / "many.yaml"
    cfg.write_text(
        "model:\n  hiden_size: 8\n"            # 2: unknown key
        "training:\n  learning_rate: abc\n"    # 4: wrong type
        "data:\n  padding_side: middle\n"      # 6: not an allowed value
        "deepspeed:\n  zero_stage: 7\n"        # 8: not an allowed value
        "hardware:\n  accelerator: tpu\n",     # 10: not an allowed value
        encoding="utf-8")
    result = run_cli("config", "validate", "--config", str(cfg))
    assert_user_error(
        result,
        f"  1. {cfg}:2: model.hiden_size: unknown key",
        f"  2. {cfg}:4: training.learning_rate = 'abc': expected a number",
        f"  3. {cfg}:6: data.padding_side = 'middle': not an allowed value",
        f"  4. {cfg}:8: deepspeed.zero_stage = 7: not an allowed value",
        f"  5. {cfg}:10: hardware.accelerator = 'tpu': not an allowed value",
        problems=5)
    assert result.stderr.count("Fix:") == 5


def test_problems_in_every_layer_are_reported_in_one_run(tmp_path: Path) -> None:
    hardware = tmp_path / "hw.yaml"
    hardware.write_text("hardware:\n\tname: x\n", encoding="utf-8")
    missing = tmp_path / "no_such_distributed.yaml"
    result = run_cli("config", "validate", "--config", TINY, "--hardware_config", str(hardware),
                     "--distributed_config", str(missing), "--hiden_size", "3")
    assert_user_error(
        result,
        f"  1. {hardware}:2:1: YAML syntax error",
        f"  2. {missing}: the --distributed_config file does not exist",
        "  3. command line (--hiden_size 3): hiden_size: unknown option --hiden_size",
        problems=3)
    assert result.stderr.count("Fix:") == 3


def test_cli_problem_does_not_hide_file_problems(tmp_path: Path) -> None:
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("model:\n  hiden_size: 8\n", encoding="utf-8")
    result = run_cli("config", "validate", "--config", str(cfg), "--num_layrs", "3")
    assert_user_error(result, f"{cfg}:2: model.hiden_size", "--num_layrs", problems=2)


# -------------------------------------------------------------------- location precision

def test_unknown_sections_point_at_their_own_lines(tmp_path: Path) -> None:
    # The section key's line, not the line of the first key inside it.
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("# comment\ntrainig:\n  batch_size: 8\n\nmodl:\n\n  hidden_size: 8\n", encoding="utf-8")
    assert_user_error(run_cli("config", "validate", "--config", str(cfg)),
                      f"  1. {cfg}:2: trainig: unknown section", f"  2. {cfg}:5: modl: unknown section",
                      "Fix: did you mean 'model'?", problems=2)


# -------------------------------------------------------------------- world size from the launcher flags

@pytest.mark.parametrize("argv", [
    ("config", "validate", "--config", TINY, "--num_gpus", "-2"),
    ("config", "validate", "--config", TINY, "--num_nodes", "-1"),
    ("config", "validate", "--all", "--world_sizes", "0"),
], ids=["num-gpus-negative", "num-nodes-negative", "world-sizes-zero"])
def test_nonpositive_world_size_is_a_user_error(argv: tuple[str, ...]) -> None:
    assert_user_error(run_cli(*argv))


# -------------------------------------------------------------------- train.py and `ava train`

@pytest.mark.parametrize("script, command", [("train.py", ()), (None, ("train",))],
                         ids=["python-train.py", "ava-train"])
def test_train_with_bad_config_exits_2_without_traceback(script: str | None, command: tuple[str, ...],
                                                         tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("model:\n  hiden_size: 8\ntraining:\n  batch_size: \"8\"\n", encoding="utf-8")
    result = run_cli(*command, "--config", str(cfg), "--hardware_config", CPU, script=script)
    assert_user_error(result,
                      f"{cfg}:2: model.hiden_size: unknown key 'hiden_size' in model",
                      "Fix: did you mean 'hidden_size'?",
                      f"{cfg}:4: training.batch_size = '8'", "Fix: remove the quotes: write 8",
                      problems=2)


@pytest.mark.parametrize("script, command", [("train.py", ()), (None, ("train",))],
                         ids=["python-train.py", "ava-train"])
@pytest.mark.parametrize("bad, expect", [
    (("--max_steps", "99999999999999999999"),
     "command line (--max_steps 99999999999999999999): training.max_steps = 99999999999999999999: must be at most 2^53"),
    (("--distributed_config", "{tmp}/huge.yaml"),
     "{tmp}/huge.yaml:1: model.hidden_size = 100000000000000000000000: must be at most 2^20"),
], ids=["max-steps-20-digits", "hidden-size-24-digits"])
def test_dry_run_refuses_a_number_past_its_bound(script: str | None, command: tuple[str, ...],
                                                 bad: tuple[str, ...], expect: str, tmp_path: Path) -> None:
    # Both once passed the dry run ("config OK") and then crashed the run: inside numpy ("Maximum allowed
    # dimension exceeded") and inside torch ("Overflow when unpacking long long").
    (tmp_path / "huge.yaml").write_text("model: {hidden_size: 100000000000000000000000}\n", encoding="utf-8")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in bad]
    result = run_cli(*command, "--config", TINY, "--hardware_config", CPU, *argv, "--dry_run", script=script)
    assert_user_error(result, expect.replace("{tmp}", str(tmp_path)), "Fix: choose a value from 1 to", problems=1)


def test_train_py_with_bad_cli_override_exits_2(tmp_path: Path) -> None:
    result = run_cli("--config", TINY, "--hardware_config", CPU, "--hiden_size", "3", script="train.py")
    assert_user_error(result, "command line (--hiden_size 3)", "Fix: did you mean --hidden_size", problems=1)


def test_train_py_without_config_exits_2() -> None:
    # argparse's own error: exit 2 and no traceback, but in argparse's format (no "Fix:").
    result = run_cli(script="train.py")
    assert_user_error(result, "the following arguments are required: --config", fix=False)


# -------------------------------------------------------------------- the control: a valid config

def test_valid_config_exits_0() -> None:
    result = run_cli("config", "validate", "--config", TINY)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert result.stderr == ""
    assert result.stdout.startswith(f"valid: {TINY}\n")
    assert "batch: micro 8 x accumulation 1 x 1 rank(s) = global 8" in result.stdout
