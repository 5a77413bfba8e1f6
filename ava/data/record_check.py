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
import socket
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

from ava.data.sources import Source
from ava.errors import UserError

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
    were skipped, files without a single document left out) and one note per
    file skipped from or left out, for the run to warn with.
    """
    if source.builder != "json":
        return source, []
    verdicts = {file: _verdict(file, source.text_field, cache_dir) for file in source.files
                if _line_suffix(file) is not None}
    if len(verdicts) == len(source.files) and all(v.wrong_field for v in verdicts.values()):
        return source, []  # no file has the field: loading names the columns they do have, a better message
    files: list[Path] = []
    notes: list[str] = []
    for file in source.files:
        verdict = verdicts.get(file)
        if verdict is None:
            files.append(file)
        elif verdict.bad and policy == "fail":
            raise UserError(
                f"{source.key}.path = {source.path!r}: {verdict.describe()}",
                "repair or delete those lines, or set data.bad_records: skip to train on the rest "
                "(the run reports how many lines it skipped)")
        elif verdict.good == 0:
            notes.append(f"{source.key}: left out {_empty(verdict)}")
        elif verdict.bad:
            files.append(_clean_copy(file, source.text_field, cache_dir))
            notes.append(f"{source.key}: skipped {verdict.describe()} (data.bad_records: skip)")
        else:
            files.append(file)
    if not files:
        raise UserError(
            f"{source.key}.path = {source.path!r} holds no documents: "
            + "; ".join(_empty(v) for v in verdicts.values()),
            "point the source at JSON Lines files with at least one record, or remove it")
    return dataclasses.replace(source, files=tuple(files)), notes


def _empty(verdict: FileVerdict) -> str:
    return verdict.describe() if verdict.bad else f"{verdict.file}, which is empty"


def _line_suffix(file: Path) -> str | None:
    suffixes = [s.lower() for s in file.suffixes[-2:]]
    if suffixes and suffixes[-1] in _OPENERS:
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes and suffixes[-1] in LINE_SUFFIXES else None


def _open(file: Path) -> IO[bytes]:
    opener = _OPENERS.get(file.suffix.lower())
    return opener(file, "rb") if opener is not None else open(file, "rb")  # type: ignore[operator]


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    record: dict[str, Any] = {}
    for key, value in pairs:
        if key in record:
            raise _DuplicateKey(key)
        record[key] = value
    return record


def _judge(raw: bytes, text_field: str) -> str | None:
    """Why one line is not a usable record (as pyarrow's reader would see it), or None when it is."""
    try:
        record = json.loads(raw, object_pairs_hook=_no_duplicates)
    except UnicodeDecodeError:
        return "not UTF-8 text"
    except json.JSONDecodeError as error:
        return f"not valid JSON ({error.msg}, column {error.colno})"
    except _DuplicateKey as error:
        return f"the key {error.args[0]!r} appears twice"
    except RecursionError:
        return "nested too deeply"
    if not isinstance(record, dict):
        return f"a JSON {type(record).__name__}, not an object"
    if text_field not in record:
        return f"no {text_field!r} field"
    value = record[text_field]
    if value is not None and not isinstance(value, str):
        return f"{text_field!r} is a {type(value).__name__}, not text"
    if value is not None:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return f"{text_field!r} holds an unpaired surrogate escape (\\ud800-\\udfff)"
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
    except (OSError, EOFError, lzma.LZMAError, zlib.error) as error:
        raise UserError(f"{file} could not be read: {error}",
                        "check the file is complete (a truncated download or copy?) and readable") from None
    verdict = FileVerdict(file, good, bad, tuple(examples), missing)
    try:  # only a cache: a read-only or full cache directory costs a re-read next time, nothing more
        _write_atomic(cached, json.dumps({"good": good, "bad": bad, "examples": examples,
                                          "missing_field": missing}).encode())
    except OSError:
        pass
    return verdict


def _clean_copy(file: Path, text_field: str, cache_dir: Path) -> Path:
    """The file's usable lines, written once into the cache under a name tied to the original's identity."""
    target = cache_dir / "clean_jsonl" / f"{_key(file, text_field)}-{file.name.split('.')[0]}.jsonl"
    if target.is_file():
        return target
    tmp = _tmp_beside(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as out:  # streamed: a corpus file can be far larger than memory
            for _, raw in _lines(file):
                if _judge(raw, text_field) is None:
                    out.write(raw if raw.endswith(b"\n") else raw + b"\n")
        os.replace(tmp, target)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise UserError(f"could not write the cleaned copy of {file} to {target.parent}: {error.strerror}",
                        "give data.cache_dir (or $AVA_CACHE_DIR) a writable directory with room for it"
                        ) from None
    return target


def _tmp_beside(path: Path) -> Path:
    """A temporary name beside `path`, unique across ranks and hosts sharing the cache."""
    return path.with_name(f"{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")


def _write_atomic(path: Path, content: bytes) -> None:
    """Write beside `path` and rename: ranks screening the same file never read a half-written one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_beside(path)
    tmp.write_bytes(content)
    os.replace(tmp, path)
