"""Config files are data: no YAML tag builds an object or runs code, and no Ava module evaluates text.

The CLI tests write a config whose value is a PyYAML code-execution tag and
check it is refused as a user error (exit 2, file and line, a fix) while the
command in it never runs. The AST test reads every module under ava/ so a new
`eval`, `exec`, unsafe YAML load, pickle load or unlisted `torch.load` fails
here with the file and line.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ava.config import yaml_loader

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "ava"

# Every torch.load in ava/, in file order: (the weights_only it passes, None when left to torch, why it may load).
TORCH_LOADS: dict[str, list[tuple[bool | None, str]]] = {
    "ava/hf/checkpoint.py": [
        (True, "a downloaded HF pytorch_model.bin: untrusted, so tensors only")],
    "ava/train/checkpoint/store.py": [
        (True, "Ava's per-rank resume state: tensors and plain values only, so a copied checkpoint runs no code"),
        (True, "the same file as an older Ava wrote it, admitting numpy's array/scalar constructors only")],
    "ava/train/checkpoint/export.py": [
        (False, "DeepSpeed's mp_rank_00_model_states.pt beside ZeRO shards, after checkpoint_trust scanned the "
                "directory (export-checkpoint) or from the run's own just-written checkpoint (train.py)"),
        (False, "the same file of a ZeRO-0 checkpoint, under the same scan")],
    "ava/train/engine/expert_parallel.py": [
        (False, "mp_rank_00_model_states.pt of an expert-parallel checkpoint, after the checkpoint_trust scan"),
        (True, "DeepSpeed's per-expert state files: plain tensor dicts")],
}
SAFE_YAML_LOADERS = {"SafeLoader", "CSafeLoader", "_AvaLoader"}
PICKLE_MODULES = {"pickle", "_pickle", "cPickle", "dill", "marshal", "shelve"}


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    return subprocess.run([sys.executable, "-m", "ava", *args], cwd=REPO, env={**env, "PYTHONDONTWRITEBYTECODE": "1"},
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("tag", ["!!python/object/apply:os.system", "!!python/object/new:os.system"])
def test_a_code_execution_tag_in_a_config_is_refused_without_running_it(tmp_path, tag):
    evidence = tmp_path / "EVIDENCE"
    config = tmp_path / "evil.yaml"
    config.write_text(f"training:\n  batch_size: 8\n  run_name: {tag} [\"touch {evidence}\"]\n")
    result = _cli("config", "validate", "--config", str(config))
    shown = f"\n--- exit {result.returncode}\n--- stdout:\n{result.stdout}\n--- stderr:\n{result.stderr}"
    assert result.returncode == 2 and "Traceback" not in result.stdout + result.stderr, shown
    assert not evidence.exists(), "the tag ran its command" + shown
    assert f"{config}:3: training.run_name: the YAML tag `{tag}` is not allowed: config files are data" in result.stderr
    assert f"Fix: delete `{tag}` and write the plain value" in result.stderr, shown


def test_a_tag_on_a_section_is_refused_not_silently_ignored(tmp_path):
    with pytest.raises(yaml_loader.ConfigError, match=r"cfg.yaml:1: training: the YAML tag `!!python/object:os.Foo`"):
        yaml_loader.load_yaml_text("training: !!python/object:os.Foo\n  run_name: x\n", "cfg.yaml")


def test_a_tag_in_a_command_line_value_stays_text_and_runs_nothing(tmp_path):
    evidence = tmp_path / "EVIDENCE"
    text = f'!!python/object/apply:pathlib.Path.touch ["{evidence}"]'
    assert yaml_loader.parse_scalar(text) == text
    assert not evidence.exists()


def test_avas_yaml_loader_is_a_safe_loader():
    assert issubclass(yaml_loader._AvaLoader, yaml.SafeLoader)


def _calls(tree: ast.AST) -> list[ast.Call]:
    return sorted((n for n in ast.walk(tree) if isinstance(n, ast.Call)), key=lambda n: (n.lineno, n.col_offset))


def _dotted(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _findings(source: str, where: str) -> tuple[list[str], list[ast.Call]]:
    """(forbidden calls as `where:line: what`, the torch.load calls) of one module's source."""
    bad, torch_loads = [], []
    for call in _calls(ast.parse(source, where)):
        name = _dotted(call.func)
        head, _, last = name.rpartition(".")
        if name in ("eval", "exec", "compile", "__import__", "builtins.eval", "builtins.exec", "builtins.compile"):
            bad.append(f"{where}:{call.lineno}: {name}() evaluates text as code")
        elif head == "yaml" and last in ("unsafe_load", "unsafe_load_all", "full_load", "full_load_all"):
            bad.append(f"{where}:{call.lineno}: yaml.{last}() can build Python objects")
        elif head == "yaml" and last in ("load", "load_all"):
            loader = _keyword(call, "Loader") or (call.args[1] if len(call.args) > 1 else None)
            if loader is None or _dotted(loader).rpartition(".")[2] not in SAFE_YAML_LOADERS:
                bad.append(f"{where}:{call.lineno}: yaml.{last}() without a safe Loader")
        elif head in PICKLE_MODULES and last in ("load", "loads", "Unpickler", "open"):
            bad.append(f"{where}:{call.lineno}: {name}() unpickles, which can run code")
        elif name == "torch.load":
            torch_loads.append(call)
    return bad, torch_loads


def test_no_module_evaluates_text_or_unpickles_and_every_torch_load_is_listed():
    bad: list[str] = []
    found: dict[str, list[bool | None]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        where = path.relative_to(REPO).as_posix()
        file_bad, loads = _findings(path.read_text(), where)
        bad += file_bad
        for call in loads:
            flag = _keyword(call, "weights_only")
            value = flag.value if isinstance(flag, ast.Constant) else None if flag is None else "computed"
            found.setdefault(where, []).append(value)
    assert bad == [], "forbidden calls:\n" + "\n".join(bad)
    expected = {file: [weights_only for weights_only, _ in calls] for file, calls in TORCH_LOADS.items()}
    assert found == expected, ("torch.load call sites changed: list each new one in TORCH_LOADS with why it may load "
                               "that file (weights_only=True unless the file holds objects only a trusted run wrote)")


def test_the_ast_check_reports_each_forbidden_form_and_not_lookalikes():
    sample = ("import pickle, re, yaml\neval('1')\nexec('x=1')\ncompile('1', 'f', 'eval')\n"
              "yaml.load(s, Loader=yaml.Loader)\nyaml.load(s)\nyaml.unsafe_load(s)\npickle.loads(b'')\n"
              "yaml.safe_load(s)\nyaml.load(s, Loader=yaml.SafeLoader)\nre.compile('x')\nmodel.eval()\n"
              "torch.load(f, weights_only=True)\n")
    bad, torch_loads = _findings(sample, "sample.py")
    assert [int(line.split(":")[1]) for line in bad] == [2, 3, 4, 5, 6, 7, 8], bad
    assert [call.lineno for call in torch_loads] == [13]
