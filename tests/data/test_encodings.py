"""Text encodings of data files: UTF-16/32 with a byte-order mark decoded exactly, anything but UTF-8 refused by name.

Every case goes through `build_training_data`, the start-up path a run takes,
under both `data.bad_records` policies where a policy could matter, and reads
the documents back from the batches (byte tokenizer: ids are the UTF-8 bytes).
"""

from __future__ import annotations

import bz2
import codecs
import csv
import gzip
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ava.config.schema.data import DataConfig
from ava.data.record_check import screened
from ava.data.setup import TrainingData, build_training_data
from ava.data.sources import load_source, resolve_source
from ava.data.tokenizer import ByteTokenizer
from ava.errors import UserError

VOCAB = 512
POLICIES = ["fail", "skip"]
# Words beyond ASCII (and beyond the BMP: 😀 is a surrogate pair in UTF-16) must come through exactly.
WORDS = "café naïve Größe 😀"


def texts(count: int = 40) -> list[str]:
    return [f"d{i} {WORDS} " * 4 for i in range(count)]


def jsonl(docs: list[str]) -> str:
    return "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs)


def paragraphs(docs: list[str]) -> str:
    return "\n\n".join(docs) + "\n"


# name -> how it writes text: each Unicode encoding with the mark its tools put in front
MARKED = {
    "utf-16-le": lambda s: codecs.BOM_UTF16_LE + s.encode("utf-16-le"),
    "utf-16-be": lambda s: codecs.BOM_UTF16_BE + s.encode("utf-16-be"),
    "utf-32-le": lambda s: codecs.BOM_UTF32_LE + s.encode("utf-32-le"),
    "utf-32-be": lambda s: codecs.BOM_UTF32_BE + s.encode("utf-32-be"),
}


def build(tmp_path: Path, file: Path, policy: str = "fail", streaming: bool = False, **source: Any) -> TrainingData:
    config = DataConfig.model_validate({
        "sources": [{"path": str(file), **source}], "bad_records": policy, "streaming": streaming,
        "max_length": 32, "max_eval_examples": 0 if streaming else 2, "shuffle_seed": 3,
        "dataloader_num_workers": 0, "cache_dir": str(tmp_path / "cache")})
    return build_training_data(config, VOCAB, micro_batch=2, eval_batch=2, rank=0, world_size=1,
                               needed_sequences=16, max_steps=4)


def trained_rows(data: TrainingData) -> list[str]:
    """One epoch of training rows, each decoded (byte tokenizer: a byte that is not UTF-8 shows as U+FFFD).

    Rows cut documents anywhere, so a character split between two rows shows as
    U+FFFD at a row's ends; those are stripped, and only the interior is judged.
    """
    rows = np.concatenate([batch.numpy() for batch in data.train])
    return [ByteTokenizer().decode(row.tolist()).strip("\ufffd") for row in rows]


def assert_read_exactly(data: TrainingData, docs: list[str]) -> None:
    rows = trained_rows(data)
    for row in rows:
        assert "\ufffd" not in row and "\ufeff" not in row and "\x00" not in row, row
    text = "".join(rows)
    assert all(word in text for word in WORDS.split())  # the non-ASCII words came through as written


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("name", MARKED)
def test_marked_utf16_and_utf32_json_lines_are_decoded_exactly(tmp_path: Path, name: str, policy: str) -> None:
    docs = texts()
    file = tmp_path / "docs.jsonl"
    file.write_bytes(MARKED[name](jsonl(docs)))
    before = file.read_bytes()
    data = build(tmp_path, file, policy)
    assert_read_exactly(data, docs)
    (note,) = data.warnings
    assert f"{file} is {name.upper().replace('-LE', 'LE').replace('-BE', 'BE')} text" in note
    assert str(tmp_path / "cache" / "utf8") in note
    assert file.read_bytes() == before, "the user's file is never rewritten"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "docs.jsonl"], "nothing beside the data"


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("name", ["utf-16-le", "utf-32-be"])
def test_marked_utf16_and_utf32_text_files_are_decoded_exactly(tmp_path: Path, name: str, policy: str) -> None:
    docs = texts()
    file = tmp_path / "docs.txt"
    file.write_bytes(MARKED[name](paragraphs(docs)))
    data = build(tmp_path, file, policy, sample_by="paragraph")
    assert_read_exactly(data, docs)
    assert len(data.warnings) == 1 and "byte-order mark" in data.warnings[0]


@pytest.mark.parametrize("policy", POLICIES)
def test_a_utf8_byte_order_mark_is_dropped_not_trained_on(tmp_path: Path, policy: str) -> None:
    docs = texts()
    for suffix, content, options in ((".txt", paragraphs(docs), {"sample_by": "paragraph"}), (".jsonl", jsonl(docs), {})):
        file = tmp_path / f"docs{suffix}"
        file.write_bytes(codecs.BOM_UTF8 + content.encode())
        data = build(tmp_path, file, policy, **options)
        assert_read_exactly(data, docs)
        assert data.warnings == ()  # UTF-8 is read as it is: no copy, nothing to warn about
    assert not (tmp_path / "cache" / "utf8").exists()


@pytest.mark.parametrize("streaming", [False, True])
def test_a_utf8_byte_order_mark_is_not_part_of_the_first_text_document(tmp_path: Path, streaming: bool) -> None:
    file = tmp_path / "docs.txt"
    file.write_bytes(codecs.BOM_UTF8 + b"first line\nsecond line\n")
    source = resolve_source("data.sources[0]", str(file), None, "text", "line", None)
    first = next(iter(load_source(source, tmp_path / "cache", streaming)))
    assert first == {"text": "first line"}


@pytest.mark.parametrize("policy", POLICIES)
def test_a_latin1_text_file_is_refused_naming_the_byte_the_guess_and_iconv(tmp_path: Path, policy: str) -> None:
    file = tmp_path / "notes.txt"
    file.write_bytes(("plain ascii first line\n\n" + "second paragraph, café au lait\n").encode("latin-1"))
    with pytest.raises(UserError) as caught:
        build(tmp_path, file, policy, sample_by="paragraph")
    message = str(caught.value)
    assert f"data.sources[0].path = '{file}': {file} is not UTF-8 text: line 3, byte 45 (0xe9) is not valid UTF-8; " \
           "it reads as Windows-1252/Latin-1: 'second paragraph, café au lait'" in message
    assert f"iconv -f CP1252 -t UTF-8 {file} > {tmp_path / 'notes.utf8.txt'}" in caught.value.fix


@pytest.mark.parametrize("policy", POLICIES)
def test_a_latin1_json_lines_file_is_refused_whole_but_a_bad_line_among_utf8_is_one_record(
        tmp_path: Path, policy: str) -> None:
    file = tmp_path / "docs.jsonl"
    file.write_bytes(jsonl([f"doc {i}" for i in range(50)] + ["Größe"] + ["more"] * 50).encode("latin-1"))
    with pytest.raises(UserError) as caught:
        build(tmp_path, file, policy)
    message = str(caught.value)
    assert f"{file} is not UTF-8 text: line 51, byte 952 (0xf6) is not valid UTF-8; " \
           "it reads as Windows-1252/Latin-1: '{\"text\": \"Größe\"}'" in message
    assert "corrupt line" not in message  # not "skip every line": one encoding problem, named once
    assert f"iconv -f CP1252 -t UTF-8 {file} >" in caught.value.fix
    assert "data.bad_records: skip does not apply" in caught.value.fix

    # Other lines hold UTF-8 beyond ASCII: the file is UTF-8, and the line that is not is one corrupt record.
    file.write_bytes(jsonl(texts(30)).encode() + b'{"text": "cut \xe2\x82"}\n' + jsonl(texts(30)).encode())
    if policy == "fail":
        with pytest.raises(UserError, match=r"1 corrupt line\(s\): line 31 \(not UTF-8 text\)"):
            build(tmp_path, file, policy)
    else:
        assert any("skipped" in w and "line 31 (not UTF-8 text)" in w for w in build(tmp_path, file, policy).warnings)


@pytest.mark.parametrize("policy", POLICIES)
def test_corrupt_lines_of_a_utf16_file_are_numbered_as_the_user_sees_them(tmp_path: Path, policy: str) -> None:
    file = tmp_path / "docs.jsonl"
    file.write_bytes(MARKED["utf-16-le"](jsonl(texts(20)) + "{cut\n" + jsonl(texts(20))))
    if policy == "fail":
        with pytest.raises(UserError, match=rf"{file}: 1 corrupt line\(s\): line 21 \(not valid JSON"):
            build(tmp_path, file, policy)
        return
    data = build(tmp_path, file, policy)
    assert_read_exactly(data, texts(20))
    assert any("skipped" in w and "line 21 (not valid JSON" in w for w in data.warnings)
    assert any("UTF-16LE text" in w for w in data.warnings)


def test_a_utf16_file_cut_mid_character_is_refused_with_the_offset(tmp_path: Path) -> None:
    file = tmp_path / "docs.txt"
    file.write_bytes(MARKED["utf-16-le"]("text\n")[:-1])  # 11 bytes: the last character lost its second byte
    with pytest.raises(UserError) as caught:
        build(tmp_path, file)
    assert f"{file} starts with a UTF-16LE byte-order mark, but byte 10 is not UTF-16LE" in str(caught.value)
    assert "cut short" in caught.value.fix
    assert not list((tmp_path / "cache" / "utf8").iterdir()), "no half-written copy is left in the cache"


@pytest.mark.parametrize("opener", [gzip.open, bz2.open])
def test_compressed_files_are_decoded_or_refused_like_plain_ones(tmp_path: Path, opener: Any) -> None:
    docs = texts()
    suffix = ".gz" if opener is gzip.open else ".bz2"
    marked = tmp_path / f"docs.jsonl{suffix}"
    with opener(marked, "wb") as f:
        f.write(MARKED["utf-16-be"](jsonl(docs)))
    assert_read_exactly(build(tmp_path, marked), docs)
    latin = tmp_path / f"notes.txt{suffix}"
    with opener(latin, "wb") as f:
        f.write("ok\n\nsoupçon\n".encode("latin-1"))
    with pytest.raises(UserError) as caught:
        build(tmp_path, latin)
    assert "line 3, byte 8 of its decompressed text (0xe7)" in str(caught.value)
    cat = "zcat" if opener is gzip.open else "bzcat"
    assert f"{cat} {latin} | iconv -f CP1252 -t UTF-8 > {tmp_path / 'notes.utf8.txt'}" in caught.value.fix


def test_csv_and_json_documents_are_decoded_or_refused_too(tmp_path: Path) -> None:
    docs = texts()
    table = tmp_path / "docs.csv"
    with table.open("w", newline="", encoding="utf-16") as f:  # Python's "utf-16" writes the mark first
        csv.writer(f).writerows([["text"], *[[d] for d in docs]])
    assert_read_exactly(build(tmp_path, table), docs)
    document = tmp_path / "all.json"
    document.write_bytes(MARKED["utf-32-le"](json.dumps([{"text": d} for d in docs], ensure_ascii=False, indent=1)))
    assert_read_exactly(build(tmp_path, document), docs)
    document.write_bytes(json.dumps([{"text": d} for d in docs], ensure_ascii=False).encode("cp1252", "replace"))
    with pytest.raises(UserError, match=rf"{document} is not UTF-8 text: line 1, byte 17 \(0xe9\)"):
        build(tmp_path, document)


def test_a_wrong_text_field_in_a_utf16_file_still_names_the_columns(tmp_path: Path) -> None:
    file = tmp_path / "docs.jsonl"
    file.write_bytes(MARKED["utf-16-le"]("".join(json.dumps({"body": d}) + "\n" for d in texts())))
    with pytest.raises(UserError, match=r"text_field = 'text' is not a column .* \(columns: body\)"):
        build(tmp_path, file)


def test_a_streamed_utf16_source_is_read_through_its_copy(tmp_path: Path) -> None:
    docs = texts(80)
    file = tmp_path / "docs.jsonl"
    file.write_bytes(MARKED["utf-16-le"](jsonl(docs)))
    data = build(tmp_path, file, streaming=True)
    batch = next(iter(data.train))
    text = ByteTokenizer().decode(batch.reshape(-1).tolist())
    assert WORDS[:10] in text and "\x00" not in text


def test_characters_and_lines_straddling_read_chunks_are_decoded_and_located(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("ava.data.encoding._CHUNK", 5)  # every multi-byte character and line crosses a chunk somewhere
    docs = texts(5)
    marked = tmp_path / "docs.jsonl"
    marked.write_bytes(MARKED["utf-16-le"](jsonl(docs)))
    cache = tmp_path / "cache"
    source = resolve_source("data.sources[0]", str(marked), None, "text", "line", None)
    (copy,) = screened(source, "fail", cache)[0].files
    assert copy.read_text(encoding="utf-8") == jsonl(docs)
    plain = tmp_path / "notes.txt"
    plain.write_bytes(paragraphs(docs).encode() + b"tail \xff\n")
    source = resolve_source("data.sources[0]", str(plain), None, "text", "paragraph", None)
    with pytest.raises(UserError, match=rf"line {paragraphs(docs).count(chr(10)) + 1}, "
                                        rf"byte {len(paragraphs(docs).encode()) + 5} \(0xff\)"):
        screened(source, "fail", cache)


def test_a_checked_utf8_file_is_not_read_again_until_it_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    file = tmp_path / "notes.txt"
    file.write_text(paragraphs(texts(5)))
    source = resolve_source("data.sources[0]", str(file), None, "text", "paragraph", None)
    screened(source, "fail", tmp_path / "cache")
    calls: list[Path] = []
    monkeypatch.setattr("ava.data.record_check.check_utf8", lambda f, where: calls.append(f))
    screened(source, "fail", tmp_path / "cache")
    assert calls == []
    file.write_text(paragraphs(texts(6)))
    screened(source, "fail", tmp_path / "cache")
    assert calls == [file]
