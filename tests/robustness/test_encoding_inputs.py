"""Data files in other text encodings, through the real train.py.

UTF-16 and UTF-32 files that start with a byte-order mark are decoded: the run
trains, warns which encoding it read and where its UTF-8 copy is, and leaves
the file as it was. A file that is not UTF-8 and has no mark (Latin-1 here) is
refused under the user-error contract of `test_run_inputs`: exit status 2, no
traceback, the file, line and byte named with the likely encoding and the
iconv command that converts it, and nothing written. Under
`data.bad_records: skip` too: a file in another encoding is not "every line
corrupt".

The runs go two at a time in one module fixture, as in `test_run_inputs`.
"""

from __future__ import annotations

import codecs
import json
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.robustness.test_run_inputs import GOOD_DOC, SOURCES, TRAIN
from tests.train.run_helpers import run_env

CAFE = '{"text": "a line of training text that is long enough to pack, café crème"}\n'
DOCS = GOOD_DOC * 150 + CAFE * 150
PARAGRAPHS = "a paragraph of training text that is long enough to pack, café crème\n\n" * 300


def marked(codec: str, mark: bytes, text: str) -> bytes:
    return mark + text.encode(codec)


@dataclass(frozen=True)
class EncodingCase:
    id: str
    file: str  # the data file's name in the case's directory
    content: bytes
    expect: tuple[str, ...]  # in stderr for a refusal, in stdout for a run; {tmp} is the case's directory
    policy: str = "fail"
    absent: tuple[str, ...] = ()  # must not be in the output
    refused: bool = True
    sample_by: str = "paragraph"


FIX = "Fix: convert it to UTF-8, e.g. iconv -f CP1252 -t UTF-8 {tmp}/"
LATIN_TXT = ("plain first paragraph\n\n" + PARAGRAPHS).encode("latin-1")  # the first é: line 3, byte 84
LATIN_JSONL = DOCS.encode("latin-1")  # line 151 is the first with an é

CASES = [
    # ------------------------------------------------------------- refused: not UTF-8, no byte-order mark
    EncodingCase("latin1-txt-fail", "notes.txt", LATIN_TXT, (
        "data.sources[0].path = '{tmp}/notes.txt': {tmp}/notes.txt is not UTF-8 text: line 3, byte 84 (0xe9) "
        "is not valid UTF-8; it reads as Windows-1252/Latin-1: '…ng text that is long enough to pack, café crème'",
        FIX + "notes.txt > {tmp}/notes.utf8.txt")),
    EncodingCase("latin1-txt-skip", "notes.txt", LATIN_TXT, (
        "{tmp}/notes.txt is not UTF-8 text: line 3, byte 84 (0xe9)", FIX + "notes.txt"), policy="skip"),
    EncodingCase("latin1-jsonl-fail", "docs.jsonl", LATIN_JSONL, (
        "{tmp}/docs.jsonl is not UTF-8 text: line 151, byte 9666 (0xe9) is not valid UTF-8; "
        "it reads as Windows-1252/Latin-1: '…ng text that is long enough to pack, café crème\"}'",
        FIX + "docs.jsonl > {tmp}/docs.utf8.jsonl"), absent=("corrupt line",)),
    EncodingCase("latin1-jsonl-skip", "docs.jsonl", LATIN_JSONL, (
        "{tmp}/docs.jsonl is not UTF-8 text: line 151, byte 9666 (0xe9)", FIX + "docs.jsonl",
        "data.bad_records: skip does not apply"), policy="skip", absent=("corrupt line", "holds no documents")),
    EncodingCase("utf16-cut-mid-character", "notes.txt",
                 marked("utf-16-le", codecs.BOM_UTF16_LE, PARAGRAPHS)[:-1], (
                     "{tmp}/notes.txt starts with a UTF-16LE byte-order mark, but byte 42000 is not UTF-16LE",
                     "Fix: the file is damaged or cut short")),
    # ------------------------------------------------------------- decoded: a byte-order mark says how
    EncodingCase("utf16le-jsonl-fail", "docs.jsonl", marked("utf-16-le", codecs.BOM_UTF16_LE, DOCS), (
        "WARNING: data.sources[0]: {tmp}/docs.jsonl is UTF-16LE text (it starts with that byte-order mark); "
        "read through its UTF-8 copy {tmp}/cache/utf8/",), refused=False),
    EncodingCase("utf16be-jsonl-with-a-corrupt-line-skip", "docs.jsonl",
                 marked("utf-16-be", codecs.BOM_UTF16_BE, DOCS + "{cut off\n" + DOCS), (
                     "WARNING: data.sources[0]: skipped {tmp}/docs.jsonl: 1 corrupt line(s): line 301 (not valid JSON",
                     "WARNING: data.sources[0]: {tmp}/docs.jsonl is UTF-16BE text"), policy="skip", refused=False),
    EncodingCase("utf32le-jsonl-fail", "docs.jsonl", marked("utf-32-le", codecs.BOM_UTF32_LE, DOCS), (
        "WARNING: data.sources[0]: {tmp}/docs.jsonl is UTF-32LE text",), refused=False),
    EncodingCase("utf32be-txt-skip", "notes.txt", marked("utf-32-be", codecs.BOM_UTF32_BE, PARAGRAPHS), (
        "WARNING: data.sources[0]: {tmp}/notes.txt is UTF-32BE text",), policy="skip", refused=False),
    EncodingCase("utf16le-txt-fail", "notes.txt", marked("utf-16-le", codecs.BOM_UTF16_LE, PARAGRAPHS), (
        "WARNING: data.sources[0]: {tmp}/notes.txt is UTF-16LE text",), refused=False),
]


@dataclass
class Outcome:
    result: subprocess.CompletedProcess[str]
    tmp: Path
    before: bytes


def _run(case: EncodingCase, tmp: Path) -> Outcome:
    data = tmp / case.file
    data.write_bytes(case.content)
    source = {"path": str(data), **({"sample_by": case.sample_by} if case.file.endswith(".txt") else {})}
    result = subprocess.run([*TRAIN, SOURCES, json.dumps([source]), "--data.bad_records", case.policy,
                             "--data.cache_dir", str(tmp / "cache"), "--output_dir", str(tmp / "out")],
                            cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=300)
    return Outcome(result, tmp, case.content)


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Outcome]:
    def one(case: EncodingCase) -> Outcome:
        return _run(case, tmp_path_factory.mktemp(case.id))

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip((c.id for c in CASES), pool.map(one, CASES), strict=True))


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_a_file_in_another_encoding_is_decoded_or_refused_by_name(case: EncodingCase,
                                                                   outcomes: dict[str, Outcome]) -> None:
    outcome = outcomes[case.id]
    result, tmp = outcome.result, outcome.tmp
    shown = f"\n--- exit {result.returncode}\n--- stdout:\n{result.stdout[-2000:]}\n--- stderr:\n{result.stderr[-3000:]}"
    said = result.stderr if case.refused else result.stdout
    for needle in case.expect:
        assert needle.replace("{tmp}", str(tmp)) in said, f"missing: {needle.replace('{tmp}', str(tmp))!r}" + shown
    for needle in case.absent:
        assert needle not in result.stdout + result.stderr, f"should not say {needle!r}" + shown
    assert "Traceback" not in result.stdout + result.stderr, "a traceback was printed" + shown
    assert "An error occurred while generating the dataset" not in result.stdout + result.stderr, shown
    assert (tmp / case.file).read_bytes() == outcome.before, "the data file itself must never be rewritten"
    if case.refused:
        assert result.returncode == 2, "expected exit status 2" + shown
        assert "Fix:" in result.stderr, "the message gives no fix" + shown
        assert not (tmp / "out").exists(), "a refused run created its output directory" + shown
        assert not list((tmp / "cache").rglob("*.tmp")), "a half-written copy was left in the cache"
    else:
        assert result.returncode == 0, "expected the run to train" + shown
        summary = json.loads((tmp / "out" / "summary.json").read_text())
        assert any("byte-order mark" in w for w in summary["warnings"]), summary["warnings"]
        assert sorted(p.name for p in tmp.iterdir()) == sorted(["cache", "out", case.file]), \
            "nothing is written beside the data"
        (copy,) = [*(tmp / "cache").glob("utf8/*"), *(tmp / "cache").glob("clean_jsonl/*")]  # what was read
        assert not copy.read_bytes().startswith(codecs.BOM_UTF8) and "café crème" in copy.read_text(encoding="utf-8")
