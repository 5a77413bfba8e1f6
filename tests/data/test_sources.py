"""Local files through `datasets`: finding them, telling their format, and reading one text column."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from ava.data.sources import load_source, resolve_source
from ava.errors import UserError
from tests.data.corpus import documents, write_csv, write_jsonl, write_parquet, write_text


def _resolve(path: Path | str, format: str | None = None, text_field: str = "text", index: int = 0):
    return resolve_source(f"data.sources[{index}]", str(path), format, text_field, "paragraph", None)


def _texts(dataset) -> list[str]:
    return [row["text"] for row in dataset]


@pytest.mark.parametrize("writer, name, builder", [
    (write_jsonl, "a.jsonl", "json"), (write_parquet, "a.parquet", "parquet"),
    (write_csv, "a.csv", "csv"), (write_text, "a.txt", "text"),
])
@pytest.mark.parametrize("streaming", [False, True])
def test_each_format_is_read_as_one_text_column_in_file_order(tmp_path: Path, writer, name: str, builder: str,
                                                               streaming: bool) -> None:
    texts = documents("doc", 7)
    source = _resolve(writer(tmp_path / name, texts))
    assert source.builder == builder
    dataset = load_source(source, tmp_path / "cache", streaming=streaming)
    assert list(dataset.features) == ["text"]
    assert _texts(dataset) == texts


def test_a_glob_and_a_directory_collect_their_files_sorted_and_skip_hidden_ones(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "d" / "b.jsonl", ["b"])
    write_jsonl(tmp_path / "d" / "sub" / "c.jsonl", ["c"])
    write_jsonl(tmp_path / "d" / "a.jsonl", ["a"])
    write_jsonl(tmp_path / "d" / ".hidden.jsonl", ["h"])
    as_dir = _resolve(tmp_path / "d")
    assert [f.name for f in as_dir.files] == ["a.jsonl", "b.jsonl", "c.jsonl"]
    as_glob = _resolve(tmp_path / "d" / "*.jsonl")
    assert [f.name for f in as_glob.files] == ["a.jsonl", "b.jsonl"]
    assert _texts(load_source(as_dir, tmp_path / "cache", streaming=False)) == ["a", "b", "c"]


def test_text_field_names_the_column_and_compressed_files_are_read(tmp_path: Path) -> None:
    plain = write_jsonl(tmp_path / "x.jsonl", ["one", "two"], field="body")
    packed = tmp_path / "x.jsonl.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    source = _resolve(packed, text_field="body")
    assert source.builder == "json"
    assert _texts(load_source(source, tmp_path / "cache", streaming=False)) == ["one", "two"]


def test_explicit_format_overrides_the_extension(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "data.log", ["x", "y"])
    assert _resolve(path, format="jsonl").builder == "json"


def _listing(directory: Path) -> list[str]:
    return sorted(str(p) for p in directory.rglob("*")) if directory.is_dir() else []


def test_reading_writes_only_to_the_cache_directory(tmp_path: Path) -> None:
    import datasets

    data = tmp_path / "data"
    write_jsonl(data / "a.jsonl", ["a", "b"])
    write_csv(data / "b.csv", ["c"])
    packed = data / "c.jsonl.gz"
    packed.write_bytes(gzip.compress(b'{"text": "d"}\n'))
    before = _listing(data)
    default_cache = Path(datasets.config.HF_DATASETS_CACHE)
    default_before = _listing(default_cache)
    for name in ("a.jsonl", "b.csv", "c.jsonl.gz"):
        for streaming in (False, True):
            _texts(load_source(_resolve(data / name), tmp_path / "cache", streaming=streaming))
    assert _listing(data) == before
    assert _listing(default_cache) == default_before  # nothing in ~/.cache/huggingface either
    assert any((tmp_path / "cache").iterdir())


@pytest.mark.parametrize("path, message", [
    ("missing.jsonl", r"data.sources\[2\].path = '.*missing.jsonl' does not exist"),
    ("nothing/*.jsonl", r"data.sources\[2\].path = '.*nothing/\*.jsonl' matches no files"),
    ("empty_dir", r"data.sources\[2\].path = '.*empty_dir' is a directory with no files"),
])
def test_a_path_with_no_files_is_refused_naming_the_key(tmp_path: Path, path: str, message: str) -> None:
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(UserError, match=message) as err:
        _resolve(tmp_path / path, index=2)
    assert err.value.fix


def test_unknown_extension_and_mixed_formats_are_refused_with_the_fix(tmp_path: Path) -> None:
    (tmp_path / "notes.xml").write_text("<a/>")
    with pytest.raises(UserError, match=r"cannot tell the format of .*notes.xml") as err:
        _resolve(tmp_path / "notes.xml")
    assert "data.sources[0].format" in err.value.fix
    write_jsonl(tmp_path / "mixed" / "a.jsonl", ["a"])
    write_csv(tmp_path / "mixed" / "b.csv", ["b"])
    with pytest.raises(UserError, match="several formats") as err:
        _resolve(tmp_path / "mixed")
    assert "one source per format" in err.value.fix
    with pytest.raises(UserError, match=r"format = 'xml' is not a known format"):
        _resolve(tmp_path / "notes.xml", format="xml")


@pytest.mark.parametrize("streaming", [False, True])
def test_missing_text_field_is_refused_listing_the_columns(tmp_path: Path, streaming: bool) -> None:
    source = _resolve(write_parquet(tmp_path / "a.parquet", ["x"], field="body"), index=1)
    with pytest.raises(UserError, match=r"data.sources\[1\].text_field = 'text' is not a column .*body, n") as err:
        load_source(source, tmp_path / "cache", streaming=streaming)
    assert "data.sources[1].text_field" in err.value.fix


def test_a_column_that_is_not_text_is_refused(tmp_path: Path) -> None:
    source = _resolve(write_csv(tmp_path / "a.csv", ["x", "y"]), text_field="n")
    with pytest.raises(UserError, match="holds int values, not text"):
        load_source(source, tmp_path / "cache", streaming=True)


def test_text_files_have_only_the_text_column(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="a text source has only the column 'text'"):
        _resolve(write_text(tmp_path / "a.txt", ["x"]), text_field="body")


def test_an_unreadable_or_empty_file_is_a_user_error(tmp_path: Path) -> None:
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(UserError, match=r"could not be read as json"):
        load_source(_resolve(tmp_path / "bad.jsonl"), tmp_path / "cache", streaming=False)
    (tmp_path / "empty.csv").write_text("text\n")
    with pytest.raises(UserError, match="holds no documents"):
        load_source(_resolve(tmp_path / "empty.csv"), tmp_path / "cache", streaming=True)


def test_fingerprint_changes_when_a_file_changes(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "a.jsonl", ["a"])
    before = _resolve(path).fingerprint()
    assert _resolve(path).fingerprint() == before
    write_jsonl(path, ["a", "b"])
    assert _resolve(path).fingerprint() != before
