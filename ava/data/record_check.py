"""JSON Lines sources screened line by line before `datasets` reads them.

Why screen at all: pyarrow's JSON reader fails a whole file on its first bad
line with "An error occurred while generating the dataset" and no line number,
and a streamed source only meets that line when it is reached, possibly hours
into a run. Reading every line once at start-up turns a corrupt record into a
start-up error with line numbers, or, under `data.bad_records: skip`, into a
cleaned copy of the file (kept in the cache, never next to the data) and a
count that the run reports.

A screened file's verdict is cached by path, size and modification time, so a
large corpus is read once, not at every start. Only `.jsonl`/`.ndjson` files
(optionally gzip/bz2/xz compressed) are screened: a `.json` file may be one
multi-line document, which has no "lines" to judge.
"""

from __future__ import annotations

import bz2
import dataclasses
import gzip
import hashlib
import json
import lzma
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal

from ava.data.sources import Source
from ava.model.errors import ModelInputError

BadRecordPolicy = Literal["fail", "skip"]
LINE_SUFFIXES = (".jsonl", ".ndjson")
_OPENERS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
_LISTED = 5  # bad lines quoted in a message; the count covers them all
_VERDICT_VERSION = 2


@dataclass(frozen=True)
class FileVerdict:
    """The bad lines of one file: 1-based numbers and why, the first few of them, and how many in all."""

    file: Path
    good: int
    bad: int
    examples: tuple[tuple[int, str], ...]
    missing_field: int = 0  # bad lines whose only fault is lacking the text field

    @property
    def wrong_field(self) -> bool:
        """No line has the text field, though all are valid JSON objects: `text_field` names the wrong column."""
        return self.good == 0 and self.bad > 0 and self.missing_field == self.bad

    def describe(self, listed: int = _LISTED) -> str:
        shown = ", ".join(f"line {n} ({why})" for n, why in self.examples[:listed])
        more = f", and {self.bad - listed} more" if self.bad > listed else ""
        return f"{self.file}: {self.bad} corrupt line(s): {shown}{more}"


def screened(source: Source, policy: BadRecordPolicy, cache_dir: Path) -> tuple[Source, list[str]]:
    """`source` with its JSON Lines files checked: an error under "fail", clean copies under "skip".

    Returns the source to load (its files replaced by clean copies where lines
    were skipped) and one note per file that had lines skipped.
    """
    if source.builder != "json":
        return source, []
    files: list[Path] = []
    notes: list[str] = []
    for file in source.files:
        if _line_suffix(file) is None:
            files.append(file)
            continue
        verdict = _verdict(file, source.text_field, cache_dir)
        if verdict.wrong_field:  # loading names the columns the file does have: a better message than per line
            files.append(file)
            continue
        if verdict.bad and policy == "fail":
            raise ModelInputError(
                f"{source.key}.path = {source.path!r}: {verdict.describe()}",
                "repair or delete those lines, or set data.bad_records: skip to train on the rest "
                "(the run reports how many lines it skipped)")
        if verdict.good == 0:
            raise ModelInputError(f"{source.key}.path = {source.path!r}: {file} holds no documents"
                                  + (f" ({verdict.describe()})" if verdict.bad else " (the file is empty)"),
                                  "point the source at non-empty JSON Lines files, or remove it")
        if verdict.bad:
            files.append(_clean_copy(file, source.text_field, cache_dir))
            notes.append(f"{source.key}: skipped {verdict.describe()} (data.bad_records: skip)")
        else:
            files.append(file)
    return dataclasses.replace(source, files=tuple(files)), notes


def _line_suffix(file: Path) -> str | None:
    suffixes = [s.lower() for s in file.suffixes[-2:]]
    if suffixes and suffixes[-1] in _OPENERS:
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes and suffixes[-1] in LINE_SUFFIXES else None


def _open(file: Path) -> IO[bytes]:
    opener = _OPENERS.get(file.suffix.lower())
    return opener(file, "rb") if opener is not None else open(file, "rb")  # type: ignore[operator]


def _judge(raw: bytes, text_field: str) -> str | None:
    """Why one line is not a usable record, or None when it is."""
    try:
        record = json.loads(raw)
    except UnicodeDecodeError:
        return "not UTF-8 text"
    except json.JSONDecodeError as error:
        return f"not valid JSON ({error.msg}, column {error.colno})"
    if not isinstance(record, dict):
        return f"a JSON {type(record).__name__}, not an object"
    if text_field not in record:
        return f"no {text_field!r} field"
    value = record[text_field]
    if value is not None and not isinstance(value, str):
        return f"{text_field!r} is a {type(value).__name__}, not text"
    return None


def _lines(file: Path) -> Iterator[tuple[int, bytes]]:
    """Non-blank lines with their 1-based numbers (blank lines are not records, and readers skip them)."""
    with _open(file) as f:
        for number, raw in enumerate(f, start=1):
            if raw.strip():
                yield number, raw


def _key(file: Path, text_field: str) -> str:
    stat = file.stat()
    identity = [_VERDICT_VERSION, str(file.resolve()), stat.st_size, stat.st_mtime_ns, text_field]
    return hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:24]


def _verdict(file: Path, text_field: str, cache_dir: Path) -> FileVerdict:
    cached = cache_dir / "record_checks" / f"{_key(file, text_field)}.json"
    if cached.is_file():
        try:
            saved = json.loads(cached.read_text())
            return FileVerdict(file, saved["good"], saved["bad"], tuple((n, why) for n, why in saved["examples"]),
                               saved["missing_field"])
        except (OSError, ValueError, KeyError, TypeError):
            pass  # a damaged cache entry is recomputed
    good, bad, missing = 0, 0, 0
    examples: list[tuple[int, str]] = []
    no_field = f"no {text_field!r} field"
    try:
        for number, raw in _lines(file):
            why = _judge(raw, text_field)
            if why is None:
                good += 1
                continue
            bad += 1
            missing += why == no_field
            if len(examples) < _LISTED:
                examples.append((number, why))
    except (OSError, EOFError, lzma.LZMAError) as error:
        raise ModelInputError(f"{file} could not be read: {error}",
                              "check the file is complete (a truncated download or copy?) and readable") from error
    verdict = FileVerdict(file, good, bad, tuple(examples), missing)
    _write_atomic(cached, json.dumps({"good": good, "bad": bad, "examples": examples, "missing_field": missing}))
    return verdict


def _clean_copy(file: Path, text_field: str, cache_dir: Path) -> Path:
    """The file's usable lines, written once into the cache under a name tied to the original's identity."""
    target = cache_dir / "clean_jsonl" / f"{_key(file, text_field)}-{file.name.split('.')[0]}.jsonl"
    if not target.is_file():
        kept = b"".join((raw if raw.endswith(b"\n") else raw + b"\n")
                        for _, raw in _lines(file) if _judge(raw, text_field) is None)
        _write_atomic(target, kept)
    return target


def _write_atomic(path: Path, content: str | bytes) -> None:
    """Write beside `path` and rename: ranks screening the same file never read a half-written one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(content.encode() if isinstance(content, str) else content)
    os.replace(tmp, path)
