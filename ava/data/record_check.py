"""Text sources screened before `datasets` reads them: their encoding, and JSON Lines line by line.

Why screen at all: pyarrow's JSON reader fails a whole file on its first bad
line with "An error occurred while generating the dataset" and no line number,
and a streamed source only meets that line when it is reached, possibly hours
into a run. Reading every line once at start-up turns a corrupt record into a
start-up error with line numbers, or, under `data.bad_records: skip`, into a
cleaned copy of the file (kept in the cache, never next to the data) and a
count that the run reports.

A screened file's verdict is cached by path, size and modification time, so a
large corpus is read once, not at every start. Only `.jsonl`/`.ndjson` files
(optionally gzip/bz2/xz compressed) are screened line by line: a `.json` file
may be one multi-line document, which has no "lines" to judge.

Every file of a text, json or csv source is also read for its encoding
(`ava.data.encoding`): UTF-16/32 with a byte-order mark is read through a UTF-8
copy in the cache, and a file in any other encoding but UTF-8 is refused. In a
JSON Lines file, a line that is not UTF-8 is one corrupt record only when other
lines hold UTF-8 characters beyond ASCII; when none do, the file as a whole is
in another encoding (Latin-1, cp1252), and it is refused under either policy:
skipping would silently drop exactly the lines with an accented letter.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

from ava.data.encoding import OPENERS, READ_ERRORS, bom_of, can_open, check_utf8, not_utf8, transcode, utf8_lines
from ava.data.sources import Source
from ava.errors import UserError

BadRecordPolicy = Literal["fail", "skip"]
LINE_SUFFIXES = (".jsonl", ".ndjson")
TEXT_BUILDERS = ("text", "json", "csv")  # the builders that read text, whose encoding matters (parquet is binary)
_LISTED = 5  # bad lines quoted in a message; the count covers them all
_VERDICT_VERSION = 3
_NOT_UTF8 = "not UTF-8 text"


@dataclass(frozen=True)
class FileVerdict:
    """The bad lines of one file: 1-based numbers and why, the first few of them, and how many in all."""

    file: Path
    good: int
    bad: int
    examples: tuple[tuple[int, str], ...]
    missing_field: int = 0  # bad lines whose only fault is lacking the text field
    encoding: str | None = None  # UTF-16/32 (by its byte-order mark), read through a UTF-8 copy; None for UTF-8

    @property
    def wrong_field(self) -> bool:
        """No line has the text field, though all are valid JSON objects: `text_field` names the wrong column."""
        return self.good == 0 and self.bad > 0 and self.missing_field == self.bad

    def describe(self, listed: int = _LISTED) -> str:
        shown = ", ".join(f"line {n} ({why})" for n, why in self.examples[:listed])
        more = f", and {self.bad - listed} more" if self.bad > listed else ""
        return f"{self.file}: {self.bad} corrupt line(s): {shown}{more}"


def screened(source: Source, policy: BadRecordPolicy, cache_dir: Path) -> tuple[Source, list[str]]:
    """`source` with its files checked: their encoding, and JSON Lines files' records.

    A corrupt record is an error under "fail" and skipped under "skip"; a file in
    an encoding other than UTF-8 that carries no byte-order mark is an error
    under both. Returns the source to load (its files replaced by UTF-8 or clean
    copies where needed, files without a single document left out) and one note
    per file decoded, skipped from or left out, for the run to warn with.
    """
    if source.builder not in TEXT_BUILDERS:
        return source, []
    named = f"{source.key}.path = {source.path!r}"
    where = f"{named}: "
    verdicts = {file: _verdict(file, source.text_field, cache_dir, where) for file in source.files
                if source.builder == "json" and _line_suffix(file) is not None}
    if len(verdicts) == len(source.files) and all(v.wrong_field for v in verdicts.values()):
        # No file has the field: loading names the columns they do have, a better message.
        utf8 = tuple(_utf8_copy(file, cache_dir) if v.encoding else file for file, v in verdicts.items())
        return dataclasses.replace(source, files=utf8), []
    files: list[Path] = []
    notes: list[str] = []
    for file in source.files:
        verdict = verdicts.get(file)
        encoding = verdict.encoding if verdict is not None else None
        if verdict is None:
            readable, encoding = _utf8_file(file, cache_dir, where)
        elif verdict.bad and policy == "fail":
            raise UserError(
                f"{where}{verdict.describe()}",
                "repair or delete those lines, or set data.bad_records: skip to train on the rest "
                "(the run reports how many lines it skipped)")
        elif verdict.good == 0:
            notes.append(f"{source.key}: left out {_empty(verdict)}")
            continue
        elif verdict.bad:
            readable = _clean_copy(file, source.text_field, cache_dir)
            notes.append(f"{source.key}: skipped {verdict.describe()} (data.bad_records: skip)")
        else:
            readable = _utf8_copy(file, cache_dir) if encoding else file
        if encoding:
            notes.append(f"{source.key}: {file} is {encoding} text (it starts with that byte-order mark); "
                         f"read through its UTF-8 copy {readable}")
        files.append(readable)
    if not files:
        raise UserError(
            f"{named} holds no documents: " + "; ".join(_empty(v) for v in verdicts.values()),
            "point the source at JSON Lines files with at least one record, or remove it")
    return dataclasses.replace(source, files=tuple(files)), notes


def _empty(verdict: FileVerdict) -> str:
    return verdict.describe() if verdict.bad else f"{verdict.file}, which is empty"


def _line_suffix(file: Path) -> str | None:
    suffixes = [s.lower() for s in file.suffixes[-2:]]
    if suffixes and suffixes[-1] in OPENERS:
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes and suffixes[-1] in LINE_SUFFIXES else None


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
        record = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except UnicodeDecodeError:
        return _NOT_UTF8
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


def _key(file: Path, *extra: str) -> str:
    """What names a file's cache entries: its absolute path, size and modification time, and `extra`."""
    stat = file.stat()
    identity = [_VERDICT_VERSION, str(file.resolve()), stat.st_size, stat.st_mtime_ns, *extra]
    return hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:24]


def _verdict(file: Path, text_field: str, cache_dir: Path, where: str) -> FileVerdict:
    cached = cache_dir / "record_checks" / f"{_key(file, text_field)}.json"
    if cached.is_file():
        try:
            saved = json.loads(cached.read_text())
            return FileVerdict(file, saved["good"], saved["bad"], tuple((n, why) for n, why in saved["examples"]),
                               saved["missing_field"], saved["encoding"])
        except (OSError, ValueError, KeyError, TypeError):
            pass  # a damaged cache entry is recomputed
    good, bad, missing = 0, 0, 0
    examples: list[tuple[int, str]] = []
    no_field = f"no {text_field!r} field"
    beyond_ascii = False  # a line holds UTF-8 beyond ASCII: the file is UTF-8, so a line that is not is corrupt
    first_not_utf8: tuple[int, int, bytes] | None = None
    try:
        bom = bom_of(file)
        for number, offset, raw in utf8_lines(file, bom):
            if not raw.strip():
                continue  # blank lines are not records, and readers skip them
            why = _judge(raw, text_field)
            beyond_ascii = beyond_ascii or (why != _NOT_UTF8 and not raw.isascii())
            if why is None:
                good += 1
                continue
            bad += 1
            missing += why == no_field
            if why == _NOT_UTF8 and first_not_utf8 is None:
                first_not_utf8 = (number, offset, raw)
            if len(examples) < _LISTED:
                examples.append((number, why))
    except READ_ERRORS as error:
        raise _unreadable(file, error) from None
    if first_not_utf8 is not None and not beyond_ascii:
        number, offset, raw = first_not_utf8
        at = _bad_byte(raw)
        raise not_utf8(file, number, offset + at, raw, at, where,
                       "; data.bad_records: skip does not apply: no line of the file holds UTF-8 beyond ASCII, "
                       "so the whole file is in another encoding, and skipping would drop every line with a "
                       "non-ASCII letter")
    encoding = bom.name if bom is not None and bom.transcoded else None
    verdict = FileVerdict(file, good, bad, tuple(examples), missing, encoding)
    _cache(cached, {"good": good, "bad": bad, "examples": examples, "missing_field": missing, "encoding": encoding})
    return verdict


def _bad_byte(raw: bytes) -> int:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as error:
        return int(error.start)
    return 0


def _utf8_file(file: Path, cache_dir: Path, where: str) -> tuple[Path, str | None]:
    """A file read whole (text, csv, a JSON document) as the readers take it, and its encoding when not UTF-8.

    UTF-8 is the file itself (checked once, then remembered); UTF-16/32 with a
    byte-order mark is its UTF-8 copy; anything else is a UserError.
    """
    if not can_open(file):
        return file, None  # zstd, lz4: left to `datasets`
    try:
        bom = bom_of(file)
        if bom is not None and bom.transcoded:
            return _utf8_copy(file, cache_dir), bom.name
        checked = cache_dir / "record_checks" / f"{_key(file, 'utf-8')}.json"
        if not checked.is_file():
            check_utf8(file, where)
            _cache(checked, {"utf8": True})
    except READ_ERRORS as error:
        raise _unreadable(file, error) from None
    return file, None


def _unreadable(file: Path, error: BaseException) -> UserError:
    return UserError(f"{file} could not be read: {error}",
                     "check the file is complete (a truncated download or copy?) and readable")


def _cache(path: Path, content: dict[str, Any]) -> None:
    """Only a cache: a read-only or full cache directory costs a re-read next time, nothing more."""
    try:
        _write_atomic(path, json.dumps(content).encode())
    except OSError:
        pass


def _clean_copy(file: Path, text_field: str, cache_dir: Path) -> Path:
    """The file's usable lines, as UTF-8, written once into the cache under a name tied to the original's identity."""
    def write(out: IO[bytes]) -> None:
        for _, _, raw in utf8_lines(file, bom_of(file)):
            if raw.strip() and _judge(raw, text_field) is None:
                out.write(raw if raw.endswith(b"\n") else raw + b"\n")

    target = cache_dir / "clean_jsonl" / f"{_key(file, text_field)}-{file.name.split('.')[0]}.jsonl"
    return _cached_copy(file, target, write)


def _utf8_copy(file: Path, cache_dir: Path) -> Path:
    """All of a UTF-16/32 file, as UTF-8, written once into the cache (uncompressed) under a name tied to its identity."""
    bom = bom_of(file)
    assert bom is not None and bom.transcoded, f"{file} has no UTF-16/32 byte-order mark"
    name = file.name[: -len(file.suffix)] if file.suffix.lower() in OPENERS else file.name
    return _cached_copy(file, cache_dir / "utf8" / f"{_key(file, 'utf8')}-{name}",
                        lambda out: transcode(file, bom, out))


_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def _cached_copy(file: Path, target: Path, write: Callable[[IO[bytes]], None]) -> Path:
    """`target`, written by `write` (streamed: a corpus file can be far larger than memory) unless it exists."""
    if target.is_file():
        return target
    tmp = _tmp_beside(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as out:
            write(out)
        os.replace(tmp, target)
    except READ_ERRORS as error:
        tmp.unlink(missing_ok=True)
        if isinstance(error, OSError) and error.errno in _WRITE_ERRNOS:
            raise UserError(f"could not write the UTF-8 or cleaned copy of {file} to {target.parent}: "
                            f"{error.strerror}",
                            "give data.cache_dir (or $AVA_CACHE_DIR) a writable directory with room for it"
                            ) from None
        raise _unreadable(file, error) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
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
