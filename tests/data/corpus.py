"""Small corpora written to disk in each format, whose documents say where they came from."""

from __future__ import annotations

import csv
import json
from pathlib import Path


def documents(tag: str, count: int, words: int = 12) -> list[str]:
    """`count` documents, each naming `tag` and its index, so a batch's text tells its origin."""
    return [" ".join([f"{tag}{i}"] * words) + "." for i in range(count)]


def write_jsonl(path: Path, texts: list[str], field: str = "text") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({field: t, "n": i}) + "\n" for i, t in enumerate(texts)))
    return path


def write_parquet(path: Path, texts: list[str], field: str = "text") -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({field: texts, "n": list(range(len(texts)))}), path)
    return path


def write_csv(path: Path, texts: list[str], field: str = "text") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([field, "n"])
        writer.writerows([t, i] for i, t in enumerate(texts))
    return path


def write_text(path: Path, texts: list[str]) -> Path:
    """One document per paragraph (blank-line separated), as `sample_by: paragraph` reads them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join(texts))
    return path
