"""JSON Lines screening: which lines are corrupt, what each policy does, and that verdicts are cached."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from ava.data.record_check import screened
from ava.data.sources import Source
from ava.errors import UserError

GOOD = '{"text": "fine"}\n'


def source(*files: Path, text_field: str = "text") -> Source:
    return Source("data.sources[0]", str(files[0]), tuple(files), "json", text_field, "paragraph", None)


def test_every_kind_of_corrupt_line_is_named_with_its_number(tmp_path: Path) -> None:
    file = tmp_path / "docs.jsonl"
    file.write_bytes(GOOD.encode() + b'{"text": "cut\n' + b"\n" + b"[1]\n" + b'{"other": 1}\n' + b'{"text": 3}\n'
                     + b'{"text": "\xff"}\n' + '{"text": "naïve"}\n'.encode())  # UTF-8 elsewhere: line 7 is corrupt
    with pytest.raises(UserError) as caught:
        screened(source(file), "fail", tmp_path / "cache")
    message = str(caught.value)
    assert f"{file}: 5 corrupt line(s): line 2 (not valid JSON (" in message
    assert "line 4 (a JSON list, not an object), line 5 (no 'text' field), line 6 ('text' is a int, not text), " \
           "line 7 (not UTF-8 text)" in message  # line 3 is blank: not a record, not an error
    assert "data.bad_records: skip" in caught.value.fix


def test_skip_loads_a_clean_copy_from_the_cache_and_leaves_the_file_alone(tmp_path: Path) -> None:
    file = tmp_path / "docs.jsonl"
    file.write_text(GOOD + "oops\n" + GOOD)
    clean, notes = screened(source(file), "skip", tmp_path / "cache")
    assert clean.files[0].parent == tmp_path / "cache" / "clean_jsonl"
    assert clean.files[0].read_text() == GOOD * 2
    assert file.read_text() == GOOD + "oops\n" + GOOD
    assert notes == [f"data.sources[0]: skipped {file}: 1 corrupt line(s): line 2 (not valid JSON (Expecting value, "
                     "column 1)) (data.bad_records: skip)"]


def test_a_wrong_text_field_is_left_to_the_loader_which_names_the_columns(tmp_path: Path) -> None:
    file = tmp_path / "docs.jsonl"
    file.write_text(GOOD * 3)
    same, notes = screened(source(file, text_field="body"), "fail", tmp_path / "cache")
    assert same.files == (file,) and notes == []


def test_compressed_files_are_screened_and_json_documents_are_not(tmp_path: Path) -> None:
    packed = tmp_path / "docs.jsonl.gz"
    with gzip.open(packed, "wt") as f:
        f.write(GOOD + "{bad\n")
    with pytest.raises(UserError, match=r"docs.jsonl.gz: 1 corrupt line\(s\): line 2"):
        screened(source(packed), "fail", tmp_path / "cache")
    document = tmp_path / "all.json"
    document.write_text(json.dumps([{"text": "a"}], indent=2))  # one multi-line JSON document: nothing to judge
    assert screened(source(document), "fail", tmp_path / "cache")[0].files == (document,)


def test_the_verdict_is_cached_until_the_file_changes(tmp_path: Path) -> None:
    file = tmp_path / "docs.jsonl"
    file.write_text(GOOD + "bad\n")
    cache = tmp_path / "cache"
    screened(source(file), "skip", cache)
    (entry,) = (cache / "record_checks").iterdir()
    saved = json.loads(entry.read_text())
    entry.write_text(json.dumps({**saved, "examples": [[2, "as cached"]]}))
    assert "as cached" in screened(source(file), "skip", cache)[1][0]
    file.write_text(GOOD + "worse\n" + "bad\n")  # size and mtime change: judged again
    assert "2 corrupt line(s)" in screened(source(file), "skip", cache)[1][0]


def test_a_file_with_no_usable_line_is_refused_even_when_skipping(tmp_path: Path) -> None:
    file = tmp_path / "docs.jsonl"
    file.write_text("no\nnope\n")
    with pytest.raises(UserError, match="holds no documents"):
        screened(source(file), "skip", tmp_path / "cache")


def test_an_empty_shard_among_others_is_left_out_with_a_note(tmp_path: Path) -> None:
    full, empty = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    full.write_text(GOOD * 2)
    empty.write_text("\n")
    kept, notes = screened(source(full, empty), "fail", tmp_path / "cache")
    assert kept.files == (full,) and notes == [f"data.sources[0]: left out {empty}, which is empty"]


def test_a_stray_file_without_the_text_field_is_corrupt_when_others_have_it(tmp_path: Path) -> None:
    docs, manifest = tmp_path / "docs.jsonl", tmp_path / "manifest.jsonl"
    docs.write_text(GOOD)
    manifest.write_text('{"files": 3}\n')
    with pytest.raises(UserError, match=r"manifest.jsonl: 1 corrupt line\(s\): line 1 \(no 'text' field\)"):
        screened(source(docs, manifest), "fail", tmp_path / "cache")


def test_lines_pyarrow_would_reject_are_caught_here(tmp_path: Path) -> None:
    file = tmp_path / "docs.jsonl"
    file.write_text(GOOD + '{"text": "a", "text": "b"}\n' + '{"text": "\\ud800"}\n')
    with pytest.raises(UserError) as caught:
        screened(source(file), "fail", tmp_path / "cache")
    assert "line 2 (the key 'text' appears twice), line 3 ('text' holds an unpaired surrogate" in str(caught.value)


def test_a_corrupt_compressed_file_is_a_user_error(tmp_path: Path) -> None:
    packed = tmp_path / "docs.jsonl.gz"
    data = gzip.compress((GOOD * 200).encode())
    packed.write_bytes(data[:20] + b"\x00" * 40 + data[60:])
    with pytest.raises(UserError, match="could not be read"):
        screened(source(packed), "fail", tmp_path / "cache")
