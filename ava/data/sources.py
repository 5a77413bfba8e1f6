"""Local corpora read through Hugging Face `datasets`: text, json/jsonl, parquet and csv files.

A source is resolved first (its path to a list of files, its format to a
`datasets` builder) so that every mistake a user can fix (no such file, a glob
that matches nothing, an unknown extension, a missing text column) is reported
with the source's config key before anything is tokenised.  Loaded sources
have exactly one column, "text", of type string, so sources of different
formats can be mixed.

`datasets` keeps its Arrow copy of a map-style source under the `cache_dir`
passed in, never next to the data; a streamed source writes nothing.
"""

from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ava.errors import UserError

if TYPE_CHECKING:
    from datasets import Dataset, IterableDataset

# Format names a user may write -> the `datasets` builder that reads them.
BUILDERS: dict[str, str] = {"text": "text", "json": "json", "jsonl": "json", "parquet": "parquet", "csv": "csv"}
# File extensions -> format, for sources that do not name one.
EXTENSIONS: dict[str, str] = {
    ".txt": "text", ".text": "text", ".md": "text",
    ".json": "json", ".jsonl": "json", ".ndjson": "json",
    ".parquet": "parquet", ".pq": "parquet",
    ".csv": "csv",
}
# Compression suffixes `datasets` undoes itself: `a.jsonl.gz` is a json file.
_COMPRESSION = (".gz", ".bz2", ".xz", ".zst", ".lz4")
_GLOB_CHARS = set("*?[")
TEXT_COLUMN = "text"


@dataclass(frozen=True)
class Source:
    """A source with its files found and its format decided."""

    key: str  # its place in the config, e.g. "data.sources[1]", for messages
    path: str  # as the user wrote it
    files: tuple[Path, ...]
    builder: str  # "text", "json", "parquet" or "csv"
    text_field: str
    sample_by: str
    weight: float | None

    def fingerprint(self) -> dict[str, Any]:
        """What identifies its content cheaply: each file's absolute path, size and modification time.

        Contents are not hashed (a corpus can be terabytes); touching a file counts as changing it.
        """
        files = [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in self.files]
        return {"builder": self.builder, "text_field": self.text_field, "sample_by": self.sample_by, "files": files}


def resolve_source(key: str, path: str, format: str | None, text_field: str, sample_by: str,
                   weight: float | None) -> Source:
    """Find the files of `path` (a file, a glob, or a directory read recursively) and decide their builder.

    Hidden files (a name starting with '.') are skipped in globs and directories.
    """
    files = _files(key, path)
    if format is not None:
        if format not in BUILDERS:
            raise UserError(f"{key}.format = {format!r} is not a known format",
                            f"use one of {', '.join(BUILDERS)}, or leave it out to infer it from the extension")
        builder = BUILDERS[format]
    else:
        builder = _infer_builder(key, path, files)
    if builder == "text" and text_field != TEXT_COLUMN:
        raise UserError(f"{key}.text_field = {text_field!r}, but a text source has only the column 'text'",
                        f"remove {key}.text_field, or give the files' real format in {key}.format")
    return Source(key, path, tuple(files), builder, text_field, sample_by, weight)


def _files(key: str, path: str) -> list[Path]:
    expanded = Path(path).expanduser()
    if _GLOB_CHARS.intersection(path):
        files = sorted(Path(p) for p in glob.glob(str(expanded), recursive=True) if Path(p).is_file())
        if not files:
            raise UserError(f"{key}.path = {path!r} matches no files",
                            "check the pattern (** needs a directory part, e.g. data/**/*.jsonl) "
                            "and that the files exist on this machine")
        return files
    if expanded.is_dir():
        files = sorted(f for f in expanded.rglob("*")
                       if f.is_file() and not any(part.startswith(".") for part in f.relative_to(expanded).parts))
        if not files:
            raise UserError(f"{key}.path = {path!r} is a directory with no files",
                            "point it at the directory that holds the data files")
        return files
    if expanded.is_file():
        return [expanded]
    raise UserError(f"{key}.path = {path!r} does not exist",
                    "give an existing file, directory or glob (relative paths are from the directory you run in)")


def format_of(file: Path) -> str | None:
    """The format a file's extension implies (compression suffixes looked through), else None."""
    suffixes = [s.lower() for s in file.suffixes]
    while suffixes and suffixes[-1] in _COMPRESSION:
        suffixes.pop()
    return EXTENSIONS.get(suffixes[-1]) if suffixes else None


def _infer_builder(key: str, path: str, files: list[Path]) -> str:
    formats: dict[str, list[Path]] = {}
    for file in files:
        found = format_of(file)
        if found is None:
            raise UserError(
                f"{key}.path = {path!r}: cannot tell the format of {file} from its extension",
                f"set {key}.format to one of {', '.join(BUILDERS)}, or narrow the path with a glob "
                f"(known extensions: {', '.join(EXTENSIONS)})")
        formats.setdefault(BUILDERS[found], []).append(file)
    if len(formats) > 1:
        examples = "; ".join(f"{name}: {group[0].name}" for name, group in formats.items())
        raise UserError(f"{key}.path = {path!r} holds files of several formats ({examples})",
                        "make one source per format, each with a glob such as dir/*.jsonl")
    return next(iter(formats))


def load_source(source: Source, cache_dir: Path, streaming: bool) -> Dataset | IterableDataset:
    """The source as a `datasets` dataset with the single string column "text".

    Reads the first document to check the text column exists and holds text, so
    a wrong `text_field` fails here, at start-up, even when streaming.
    """
    from datasets import Features, Value, load_dataset

    # A text file may start with a UTF-8 byte-order mark, which "utf-8" would keep as a first character
    # (the json and csv readers skip it themselves); other encodings are turned away or decoded before this
    # (`ava.data.record_check`).
    options = {"sample_by": source.sample_by, "encoding": "utf-8-sig"} if source.builder == "text" else {}
    if all(f.stat().st_size == 0 for f in source.files):  # readers fail on these with an empty message
        raise UserError(f"{source.key}.path = {source.path!r} holds no documents (its files are empty)",
                        "point it at non-empty files, or remove the source")
    try:
        dataset = load_dataset(source.builder, data_files=[str(f) for f in source.files], split="train",
                               streaming=streaming, cache_dir=str(cache_dir), **options)
        first = next(iter(dataset), None)
    except Exception as error:  # datasets and its readers raise many types; the cause is the file either way
        raise UserError(f"{source.key}.path = {source.path!r} could not be read as {source.builder}: {error}",
                        f"check the files are valid {source.builder}, or set {source.key}.format") from error
    if first is None:
        raise UserError(f"{source.key}.path = {source.path!r} holds no documents",
                        "point it at non-empty files, or remove the source")
    if source.text_field not in first:
        raise UserError(
            f"{source.key}.text_field = {source.text_field!r} is not a column of {source.path!r} "
            f"(columns: {', '.join(map(str, first))})",
            f"set {source.key}.text_field to the column that holds the text")
    value = first[source.text_field]
    if value is not None and not isinstance(value, str):
        raise UserError(
            f"{source.key}.text_field = {source.text_field!r} in {source.path!r} holds "
            f"{type(value).__name__} values, not text",
            f"set {source.key}.text_field to the column that holds the text")
    dataset = dataset.select_columns([source.text_field])
    if source.text_field != TEXT_COLUMN:
        dataset = dataset.rename_column(source.text_field, TEXT_COLUMN)
    # csv gives large_string, the others string; mixing needs one type. A stream's `cast` only relabels
    # its examples, while interleaving and shuffling join its raw Arrow tables with other sources' (and
    # fail on the mismatch), so a stream is re-typed batch by batch as it is read.
    text_only = Features({TEXT_COLUMN: Value("string")})
    if streaming:
        return dataset.map(_same_texts, batched=True, features=text_only)
    return dataset if dataset.features == text_only else dataset.cast(text_only)


def _same_texts(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
    return {TEXT_COLUMN: batch[TEXT_COLUMN]}
