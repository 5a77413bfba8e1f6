"""Bad inputs met when a run starts: data, tokenizer, output directory and checkpoints, through the real train.py.

Each case starts `python train.py` (or `python -m ava model export-checkpoint`)
in a subprocess with one thing wrong and holds it to the user-error contract:

* exit status 2 and no traceback;
* stderr names the file, key or record and gives a `Fix:`;
* nothing is lost: a fresh --output_dir is not even created, and every file
  already there (a previous run, its checkpoints) is byte-for-byte unchanged
  and nothing is added beside it.

The cases run two at a time in one module fixture (each is mostly torch's
import); the parametrised tests then read their results.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO
from tests.robustness.refusal import assert_refused_cleanly
from tests.train.run_helpers import SMALL_RUN, TINY, run_env

SHRUNK = [*SMALL_RUN, "--hidden_size", "32", "--num_layers", "1", "--max_steps", "3", "--warmup_steps", "1"]
TRAIN = [sys.executable, "train.py", *TINY, *SHRUNK]
EXPORT = [sys.executable, "-m", "ava", "model", "export-checkpoint"]
GOOD_DOC = '{"text": "a line of training text that is long enough to pack"}\n'
EVIDENCE = "EVIDENCE"


class Malicious:
    """Pickles as a call to shutil.copyfile: unpickling it would create the evidence file."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self) -> tuple:
        return (shutil.copyfile, (__file__, str(self.target)))


@dataclass(frozen=True)
class RunCase:
    id: str
    argv: list[str]  # after TRAIN (or EXPORT when export=True); {tmp} is the case's directory, {run} its run copy
    expect: tuple[str, ...]  # fragments of stderr, with {tmp} and {run} replaced
    setup: Callable[[Path], None] = lambda tmp: None
    needs_run: bool = False  # gets {run}: a copy of a finished 3-step run with checkpoints at steps 2 and 3
    export: bool = False
    fresh_out: bool = True  # passes a new --output_dir {tmp}/out that must not be created
    env: dict[str, str] = field(default_factory=dict)


def _write(path: Path, content: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())


def _tokens(path: Path, ids: list[int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.array(ids, dtype=np.uint16).tofile(path)


def _bin_dir(train: list[int] | bytes, val: list[int] | None = None) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        if isinstance(train, bytes):
            _write(tmp / "data" / "train.bin", train)
        else:
            _tokens(tmp / "data" / "train.bin", train)
        if val is not None:
            _tokens(tmp / "data" / "val.bin", val)
    return setup


def _jsonl(text: str, name: str = "docs.jsonl") -> Callable[[Path], None]:
    return lambda tmp: _write(tmp / name, text)


def _ckpt(run: Path, step: int = 3) -> Path:
    return run / "checkpoints" / f"step{step:08d}"


def _truncate(relative: str, keep: int) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        file = tmp / "run" / relative
        file.write_bytes(file.read_bytes()[:keep])
    return setup


def _malicious_state(protocol: int) -> Callable[[Path], None]:
    """The run's latest model states, re-saved with a pickled call to shutil.copyfile beside the weights."""
    def setup(tmp: Path) -> None:
        import torch

        file = _ckpt(tmp / "run") / "mp_rank_00_model_states.pt"
        state = torch.load(file, map_location="cpu", weights_only=True)
        state["note"] = Malicious(tmp / EVIDENCE)
        torch.save(state, file, pickle_protocol=protocol)
    return setup


SOURCES = "--data.sources"
VALID = list(range(1, 200)) * 10

CASES = [
    # ------------------------------------------------------------- pre-tokenised data
    RunCase("bin-token-beyond-vocabulary", ["--data.data_dir", "{tmp}/data"], (
        "{tmp}/data/train.bin: token at position 2 is 5000, beyond the vocabulary (vocab_size = 4096)",
        "Fix: tokenise with the tokenizer the model is configured for"),
        setup=_bin_dir([1, 2, 5000, 3] * 300, VALID)),
    RunCase("bin-truncated-odd-size", ["--data.data_dir", "{tmp}/data"], (
        "{tmp}/data/train.bin is 3 bytes, not a multiple of 2 (uint16): truncated", "Fix: re-run tokenisation"),
        setup=_bin_dir(b"\x01\x00\x02", VALID)),
    RunCase("bin-empty-dataset", ["--data.data_dir", "{tmp}/data"], (
        "{tmp}/data/train.bin is empty",), setup=_bin_dir(b"", VALID)),
    RunCase("bin-validation-file-missing", ["--data.data_dir", "{tmp}/data"], (
        "data.data_dir = {tmp}/data has no val.bin", "Fix: put train.bin and val.bin"), setup=_bin_dir(VALID)),
    RunCase("data-dir-missing", ["--data.data_dir", "{tmp}/no_such_dir"], (
        "data.data_dir = {tmp}/no_such_dir does not exist", "Fix: point data.data_dir at the directory")),
    RunCase("bin-too-short-for-one-batch", ["--data.data_dir", "{tmp}/data"], (
        "Fix:",), setup=_bin_dir([1, 2, 3] * 10, [1, 2, 3] * 10)),
    # ------------------------------------------------------------- text sources
    RunCase("jsonl-corrupt-lines-fail-with-line-numbers",
            [SOURCES, '[{"path": "{tmp}/docs.jsonl"}]'], (
                "data.sources[0].path", "{tmp}/docs.jsonl: 3 corrupt line(s)", "line 2 (not valid JSON",
                "line 4 (a JSON list, not an object)", "line 6 ('text' is a int, not text)",
                "Fix: repair or delete those lines, or set data.bad_records: skip"),
            setup=_jsonl(GOOD_DOC + '{"text": "cut off\n' + GOOD_DOC + "[1, 2]\n" + GOOD_DOC + '{"text": 7}\n'
                         + GOOD_DOC * 200)),
    RunCase("jsonl-every-line-corrupt-with-skip", [SOURCES, '[{"path": "{tmp}/docs.jsonl"}]',
                                                   "--data.bad_records", "skip"], (
        "data.sources[0].path = '{tmp}/docs.jsonl' holds no documents: {tmp}/docs.jsonl: 2 corrupt line(s)",
        "Fix: point the source at JSON Lines files with at least one record"),
        setup=_jsonl("not json\n{broken\n")),
    RunCase("jsonl-empty-file", [SOURCES, '[{"path": "{tmp}/docs.jsonl"}]'], (
        "holds no documents: {tmp}/docs.jsonl, which is empty",), setup=_jsonl("")),
    RunCase("jsonl-wrong-text-field", [SOURCES, '[{"path": "{tmp}/docs.jsonl", "text_field": "body"}]'], (
        "data.sources[0].text_field = 'body' is not a column", "(columns: text)",
        "Fix: set data.sources[0].text_field"), setup=_jsonl(GOOD_DOC * 50)),
    RunCase("source-path-missing", [SOURCES, '[{"path": "{tmp}/nothing_here.jsonl"}]'], (
        "data.sources[0].path = '{tmp}/nothing_here.jsonl' does not exist",)),
    RunCase("source-glob-matches-nothing", [SOURCES, '[{"path": "{tmp}/*.parquet"}]'], (
        "matches no files",), setup=_jsonl(GOOD_DOC)),
    RunCase("tokenizer-file-missing", [SOURCES, '[{"path": "{tmp}/docs.jsonl"}]',
                                       "--data.tokenizer_name", "{tmp}/tokenizer.json"], (
        "tokenizer file {tmp}/tokenizer.json does not exist", "Fix: point data.tokenizer_name at a tokenizer.json"),
        setup=_jsonl(GOOD_DOC * 50)),
    RunCase("tokenizer-file-corrupt", [SOURCES, '[{"path": "{tmp}/docs.jsonl"}]',
                                       "--data.tokenizer_name", "{tmp}/tokenizer.json"], (
        "tokenizer file {tmp}/tokenizer.json could not be read as a tokenizer.json",),
        setup=lambda tmp: (_jsonl(GOOD_DOC * 50)(tmp), _write(tmp / "tokenizer.json", "{not a tokenizer"))),
    # ------------------------------------------------------------- output directory
    RunCase("output-dir-not-empty-without-resume", ["--output_dir", "{run}"], (
        "the output directory {run} already holds files; Ava never overwrites a run",
        "Fix: choose a new --output_dir"), needs_run=True, fresh_out=False),
    RunCase("resume-with-no-checkpoint", ["--output_dir", "{tmp}/notes", "--resume"], (
        "{tmp}/notes/checkpoints holds no complete checkpoint to resume from",),
        setup=lambda tmp: _write(tmp / "notes" / "notes.txt", "precious\n"), fresh_out=False),
    RunCase("resume-latest-points-at-missing-tag", ["--output_dir", "{tmp}/notes", "--resume"], (
        "holds no complete checkpoint to resume from",),
        setup=lambda tmp: _write(tmp / "notes" / "checkpoints" / "latest", "step00000009\n"), fresh_out=False),
    RunCase("resume-from-missing-path", ["--resume_from", "{tmp}/gone/checkpoints/step00000002"], (
        "--resume_from {tmp}/gone/checkpoints/step00000002 is not a complete Ava checkpoint",)),
    RunCase("resume-from-incomplete-checkpoint", ["--resume_from", "{tmp}/half"], (
        "--resume_from {tmp}/half is not a complete Ava checkpoint (no COMPLETE)",),
        setup=lambda tmp: shutil.copytree(_ckpt(tmp / "run"), tmp / "half", ignore=shutil.ignore_patterns("COMPLETE")),
        needs_run=True),
    # ------------------------------------------------------------- checkpoints
    RunCase("checkpoint-model-states-truncated", ["--output_dir", "{run}", "--resume", "--max_steps", "4"], (
        "checkpoint file {run}/checkpoints/step00000003/mp_rank_00_model_states.pt is corrupt or truncated",
        "Fix: restore the file from a copy, or start again from one of step00000002"),
        setup=_truncate("checkpoints/step00000003/mp_rank_00_model_states.pt", 4000), needs_run=True,
        fresh_out=False),
    RunCase("checkpoint-ava-state-garbage", ["--output_dir", "{run}", "--resume", "--max_steps", "4"], (
        "{run}/checkpoints/step00000003/ava_state_rank0.pt cannot be read as Ava checkpoint state",
        "Fix: resume from an earlier complete checkpoint"),
        setup=lambda tmp: _write(_ckpt(tmp / "run") / "ava_state_rank0.pt", b"garbage"), needs_run=True,
        fresh_out=False),
    RunCase("checkpoint-ava-state-truncated", ["--output_dir", "{run}", "--resume", "--max_steps", "4"], (
        "ava_state_rank0.pt cannot be read as Ava checkpoint state", "the checkpoint is corrupt"),
        setup=_truncate("checkpoints/step00000003/ava_state_rank0.pt", 300), needs_run=True, fresh_out=False),
    RunCase("checkpoint-rank-state-missing", ["--output_dir", "{run}", "--resume", "--max_steps", "4"], (
        "{run}/checkpoints/step00000003 lacks ava_state_rank0.pt: it holds the state of 0 rank(s), "
        "and this run has 1",),
        setup=lambda tmp: (_ckpt(tmp / "run") / "ava_state_rank0.pt").unlink(), needs_run=True, fresh_out=False),
    RunCase("checkpoint-from-another-model-shape", ["--output_dir", "{run}", "--resume", "--max_steps", "4",
                                                    "--hidden_size", "64"], (
        "was written by a model of another shape (model.hidden_size: 32 in the checkpoint, 64 now)",
        "Fix: resume with the model settings recorded in {run}/config.yaml"), needs_run=True, fresh_out=False),
    RunCase("checkpoint-from-another-expert-count", ["--resume_from", "{run}/checkpoints/step00000002",
                                                     "--num_experts", "2"], (
        "model.num_experts: 4 in the checkpoint, 2 now",), needs_run=True),
    RunCase("checkpoint-with-another-batch-size", ["--output_dir", "{run}", "--resume", "--max_steps", "4",
                                                   "--batch_size", "2"], (
        "the batch configuration differs from the checkpoint's (train_batch_size: 4 -> 2", "--force_resume"),
        needs_run=True,
        fresh_out=False),
    RunCase("checkpoint-pickle-that-runs-code", ["--resume_from", "{run}/checkpoints/step00000003"], (
        "mp_rank_00_model_states.pt: shutil.copyfile", "loading it would run whatever those name",
        "Fix: if you know where this checkpoint came from and trust it, pass --trust_checkpoint"),
        setup=_malicious_state(2), needs_run=True),
    RunCase("checkpoint-pickle-protocol-the-scanner-cannot-read", ["--output_dir", "{run}", "--resume",
                                                                   "--max_steps", "4"], (
        "mp_rank_00_model_states.pt: a pickle the safe scanner cannot read", "--trust_checkpoint"),
        setup=_malicious_state(pickle.HIGHEST_PROTOCOL), needs_run=True, fresh_out=False),
    RunCase("export-checkpoint-truncated", ["{run}", "--out", "{tmp}/out"], (
        "is corrupt or truncated",), setup=_truncate("checkpoints/step00000003/mp_rank_00_model_states.pt", 4000),
        needs_run=True, export=True, fresh_out=False),
    RunCase("export-checkpoint-pickle-that-runs-code", ["{run}", "--out", "{tmp}/out"], (
        "loading it would run whatever those name", "--trust_checkpoint"), setup=_malicious_state(2), needs_run=True,
        export=True, fresh_out=False),
]


def _fingerprint(root: Path) -> dict[str, str]:
    """Every file under `root` with its content hash: what must survive a refused start unchanged."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _fill(text: str, tmp: Path) -> str:
    return text.replace("{tmp}", str(tmp)).replace("{run}", str(tmp / "run"))


@dataclass
class Outcome:
    result: subprocess.CompletedProcess[str]
    before: dict[str, str]
    after: dict[str, str]
    tmp: Path


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-step run with complete checkpoints at steps 2 and 3, copied by the cases that need one."""
    out = tmp_path_factory.mktemp("finished") / "run"
    result = subprocess.run([*TRAIN, "--save_steps", "2", "--output_dir", str(out)], cwd=REPO, env=run_env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def outcomes(finished_run: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Outcome]:
    def one(case: RunCase) -> Outcome:
        tmp = tmp_path_factory.mktemp(case.id)
        if case.needs_run:
            shutil.copytree(finished_run, tmp / "run")
        case.setup(tmp)
        before = _fingerprint(tmp)
        head = EXPORT if case.export else TRAIN
        out = ["--output_dir", str(tmp / "out")] if case.fresh_out else []
        result = subprocess.run([*head, *(_fill(a, tmp) for a in case.argv), *out], cwd=REPO,
                                env={**run_env(), **case.env}, capture_output=True, text=True, timeout=300)
        return Outcome(result, before, _fingerprint(tmp), tmp)

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip((c.id for c in CASES), pool.map(one, CASES), strict=True))


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_run_input_is_refused_cleanly(case: RunCase, outcomes: dict[str, Outcome]) -> None:
    outcome = outcomes[case.id]
    result, tmp = outcome.result, outcome.tmp
    shown = assert_refused_cleanly(result, [_fill(needle, tmp) for needle in case.expect])
    assert outcome.after == outcome.before, "files were changed, added or deleted by a refused start" + shown
    assert not (tmp / "out").exists(), "a refused run created its output directory" + shown
    assert not (tmp / EVIDENCE).exists(), "a pickled call in the checkpoint was executed"


def test_corrupt_lines_can_be_skipped_and_are_counted(tmp_path: Path, finished_run: Path) -> None:
    """data.bad_records: skip trains on the good lines, warns with the count and line numbers, records it."""
    docs = tmp_path / "docs.jsonl"
    docs.write_text(GOOD_DOC * 100 + "{broken\n" + GOOD_DOC * 100 + '"just a string"\n' + GOOD_DOC * 100)
    before = docs.read_bytes()
    out = tmp_path / "out"
    result = subprocess.run([*TRAIN, SOURCES, json.dumps([{"path": str(docs)}]), "--data.bad_records", "skip",
                             "--data.cache_dir", str(tmp_path / "cache"), "--output_dir", str(out)],
                            cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    warning = f"data.sources[0]: skipped {docs}: 2 corrupt line(s): line 101 (not valid JSON"
    assert f"WARNING: {warning}" in result.stdout
    assert "line 202 (a JSON str, not an object)" in result.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert any(w.startswith(warning) for w in summary["warnings"]), summary["warnings"]
    assert docs.read_bytes() == before, "the source file itself must never be rewritten"
    assert not list(tmp_path.glob("*.jsonl.*")), "nothing is written next to the data"
