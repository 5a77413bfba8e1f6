"""The text encoding of a data file, its text as UTF-8, and the message when it is neither.

The readers behind `data.sources` (`datasets`' text and csv builders, pyarrow's
JSON reader) take UTF-8 only, and fail on anything else with a message that
names neither the file, nor the line, nor the encoding. So the files are looked
at first, at start-up (`ava.data.record_check`), and:

* UTF-8 is read as it is; a UTF-8 byte-order mark is dropped.
* UTF-16 and UTF-32 with a byte-order mark (what Windows tools save as
  "Unicode") are decoded: the mark says exactly which encoding it is, the
  decoding is exact, and it costs one pass that writes a UTF-8 copy into the
  cache, which the readers then read. The user's file is never touched.
* Anything else is refused, naming the first byte that is not UTF-8 (its line
  and offset), the encoding it most likely is, and the iconv command that
  converts it. It is not decoded on a guess: without a mark, Latin-1, cp1252
  and a dozen other code pages each decode every byte, and a wrong guess would
  train on garbled text without a word.

Plain and gzip/bz2/xz-compressed files are read here; `.zst` and `.lz4`, which
`datasets` undoes with libraries Ava does not need, are left to it.
"""

from __future__ import annotations

import bz2
import codecs
import gzip
import lzma
import shlex
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from ava.errors import UserError

OPENERS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
READ_ERRORS = (OSError, EOFError, lzma.LZMAError, zlib.error)  # a truncated or damaged (compressed) file
_NOT_OPENED = (".zst", ".lz4")
_CATS = {".gz": "zcat", ".bz2": "bzcat", ".xz": "xzcat"}
_CHUNK = 1 << 20
_SHOWN = 40  # bytes either side of a bad byte quoted in a message


@dataclass(frozen=True)
class Bom:
    """A byte-order mark, the codec of the text after it, and the encoding's name (as iconv spells it)."""

    mark: bytes
    codec: str
    name: str

    @property
    def transcoded(self) -> bool:
        """Whether the readers need a UTF-8 copy (a UTF-8 mark is only skipped)."""
        return self.codec != "utf-8"


# UTF-32 LE before UTF-16 LE: its mark, FF FE 00 00, begins with UTF-16 LE's FF FE.
BOMS = (Bom(codecs.BOM_UTF32_LE, "utf-32-le", "UTF-32LE"), Bom(codecs.BOM_UTF32_BE, "utf-32-be", "UTF-32BE"),
        Bom(codecs.BOM_UTF8, "utf-8", "UTF-8"), Bom(codecs.BOM_UTF16_LE, "utf-16-le", "UTF-16LE"),
        Bom(codecs.BOM_UTF16_BE, "utf-16-be", "UTF-16BE"))


def can_open(file: Path) -> bool:
    """Whether this module reads the file's bytes: plain, gzip, bz2 or xz."""
    return file.suffix.lower() not in _NOT_OPENED


def open_bytes(file: Path) -> IO[bytes]:
    """The file's bytes, decompressed when its name ends in .gz, .bz2 or .xz."""
    opener = OPENERS.get(file.suffix.lower())
    return opener(file, "rb") if opener is not None else open(file, "rb")  # type: ignore[operator]


def bom_of(file: Path) -> Bom | None:
    """The byte-order mark the (decompressed) file starts with, if any."""
    with open_bytes(file) as f:
        head = f.read(4)
    return next((bom for bom in BOMS if head.startswith(bom.mark)), None)


def utf8_lines(file: Path, bom: Bom | None) -> Iterator[tuple[int, int, bytes]]:
    """Every line as UTF-8 bytes, with its 1-based number and the byte offset it starts at; `bom` is `bom_of(file)`.

    A UTF-8 file's lines are its own bytes, unchecked (the caller judges each
    line), with the mark dropped from the first; offsets are the file's own. A
    UTF-16/32 file is decoded and its lines re-encoded; offsets are then those
    of the UTF-8 text, and a byte that does not decode is a UserError.
    """
    with open_bytes(file) as f:
        if bom is None or not bom.transcoded:
            offset = len(bom.mark) if bom else 0
            f.read(offset)
            for number, raw in enumerate(f, start=1):
                yield number, offset, raw
                offset += len(raw)
            return
        number, offset = 0, 0
        held: list[str] = []  # the start of a line that has not ended yet
        for text in _decoded(f, bom, file):
            *ended, rest = text.split("\n")
            for part in ended:
                raw = ("".join(held) + part + "\n").encode("utf-8")
                held = []
                number += 1
                yield number, offset, raw
                offset += len(raw)
            held.append(rest)
        if "".join(held):
            yield number + 1, offset, "".join(held).encode("utf-8")


def transcode(file: Path, bom: Bom, out: IO[bytes]) -> None:
    """Write the text of a UTF-16/32 `file` (after its mark) to `out` as UTF-8, without a mark."""
    with open_bytes(file) as f:
        for text in _decoded(f, bom, file):
            out.write(text.encode("utf-8"))


def _decoded(stream: IO[bytes], bom: Bom, file: Path) -> Iterator[str]:
    """The text after the mark, decoded a chunk at a time (a character may straddle two chunks)."""
    decoder = codecs.getincrementaldecoder(bom.codec)()
    offset = len(stream.read(len(bom.mark)))
    while True:
        chunk = stream.read(_CHUNK)
        buffered = len(decoder.getstate()[0])  # bytes of a character begun in the last chunk
        try:
            text = decoder.decode(chunk, final=not chunk)
        except UnicodeDecodeError as error:
            raise UserError(
                f"{file} starts with a {bom.name} byte-order mark, but byte {offset - buffered + error.start} "
                f"is not {bom.name} ({error.reason})",
                f"the file is damaged or cut short ({bom.name} text is a whole number of "
                f"{2 if '16' in bom.name else 4}-byte units): export or copy it again, as UTF-8 if you can"
            ) from None
        yield text
        if not chunk:
            return
        offset += len(chunk)


def check_utf8(file: Path, where: str = "") -> None:
    """Read all of `file`: a UserError (prefixed with `where`) at its first byte that is not UTF-8.

    A UTF-8 byte-order mark at the start is allowed.
    """
    decoder = codecs.getincrementaldecoder("utf-8")()
    with open_bytes(file) as f:
        chunk = f.read(_CHUNK)
        offset = len(codecs.BOM_UTF8) if chunk.startswith(codecs.BOM_UTF8) else 0
        chunk, newlines = chunk[offset:], 0
        while True:
            buffered = len(decoder.getstate()[0])
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as error:
                at = max(0, error.start - buffered)  # where the bad sequence starts in this chunk (or at its start)
                raise not_utf8(file, newlines + chunk.count(b"\n", 0, at) + 1, offset - buffered + error.start,
                               chunk, at, where) from None
            if not chunk:
                return
            newlines += chunk.count(b"\n")
            offset += len(chunk)
            chunk = f.read(_CHUNK)


def not_utf8(file: Path, line: int, offset: int, text: bytes, at: int, where: str = "", also: str = "") -> UserError:
    """The refusal of a file that is not UTF-8, at `line` and byte `offset`: `text[at]` is that byte.

    The bytes around it, decoded the likeliest other way, show the user the guess
    is right; `where` prefixes the message and `also` ends the fix.
    """
    line_start, line_end = text.rfind(b"\n", 0, at) + 1, text.find(b"\n", at)
    line_end = len(text) if line_end < 0 else line_end
    start, end = max(line_start, at - _SHOWN), min(line_end, at + _SHOWN)
    sample = text[start:end].rstrip(b"\r")
    byte = f"byte {offset}" + (" of its decompressed text" if file.suffix.lower() in OPENERS else "")
    byte += f" (0x{text[at]:02x})" if at < len(text) else " (a character cut off at the end)"
    if b"\x00" in sample:
        guess, code = "it holds NUL bytes, so it is likely UTF-16 or UTF-32 without a byte-order mark", "UTF-16LE"
    else:
        try:
            guess, code, decoded = "Windows-1252/Latin-1", "CP1252", sample.decode("cp1252")
        except UnicodeDecodeError:  # five bytes cp1252 leaves undefined; Latin-1 decodes them all
            guess, code, decoded = "Latin-1 (ISO-8859-1)", "LATIN1", sample.decode("latin-1")
        left, right = ("…" if start > line_start else ""), ("…" if end < line_end else "")  # the line goes on
        guess = f"it reads as {guess}: {left + decoded + right!r}"
    return UserError(
        f"{where}{file} is not UTF-8 text: line {line}, {byte} is not valid UTF-8; {guess}",
        f"convert it to UTF-8, e.g. {iconv(file, code)} (if {code} is the wrong guess, "
        "name the encoding it was saved in), and point the source at the converted file" + also)


def iconv(file: Path, code: str) -> str:
    """The shell command that writes a UTF-8 copy of `file`, beside it, from the encoding `code`."""
    cat = _CATS.get(file.suffix.lower())
    plain = file.with_suffix("") if cat else file
    target = shlex.quote(str(plain.with_name(f"{plain.stem}.utf8{plain.suffix}")))
    if cat:
        return f"{cat} {shlex.quote(str(file))} | iconv -f {code} -t UTF-8 > {target}"
    return f"iconv -f {code} -t UTF-8 {shlex.quote(str(file))} > {target}"
