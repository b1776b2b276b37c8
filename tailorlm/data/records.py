"""What every reader produces (Record, Table) and the file helpers the text readers share.

Its own module so that the readers (tabular.py, formats.py, hf.py, memory.py, builtin.py) and the dispatch
that chooses between them (sources.py) all import from here and never from each other in a circle.
"""
from __future__ import annotations

import codecs
import contextvars
import gzip
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tailorlm.errors import DataError

# The text encoding of the table being read (data.encoding). A context variable rather than a parameter of
# every reader: only read_text needs it.
ENCODING = contextvars.ContextVar("encoding", default="utf-8")
PAIR_SEPARATOR = "|"  # 'train.en|train.de': the two sides of a parallel corpus
# A line this long is nearly always a binary file, a file with no line breaks, or an unclosed quote that swallowed
# the rest of the file; stopping early names the line instead of building one giant sample.
MAX_LINE_CHARS = 1_000_000
GZIP_MAGIC = b"\x1f\x8b"


@dataclass
class Record:
    fields: dict[str, Any]
    where: str  # "line 12", "row 5", "DataFrame row 3", or a file for one-file-per-sample corpora


@dataclass
class Table:
    path: str  # the source as the user named it (a file, 'hf:NAME', 'memory:NAME'), plus the split when picked
    records: list[Record]
    # Column -> the class names of a Hugging Face ClassLabel column, whose values are the indices into it;
    # they become the label words when data.label_names does not give its own.
    class_names: dict[str, list[str]] = field(default_factory=dict)

    @property
    def columns(self) -> list[str]:
        return list(self.records[0].fields) if self.records else []


def source_error(field: str | None, source: str, problem: str) -> DataError:
    """A problem with a whole source, told as 'data.train: hf:imdb could not ...' when the config field naming
    it is known (the field is what to change), else as 'hf:imdb: could not ...'."""
    return DataError(field, None, f"{source} {problem}") if field else DataError(source, None, problem)


def check_file(path: Path) -> None:
    if not path.is_file():
        raise DataError(path, None, "file not found" if not path.exists() else "not a regular file")


def file_suffix(path: Path) -> str:
    """The extension that names the format: 'train.jsonl.gz' is JSONL."""
    suffixes = [s.lower() for s in path.suffixes]
    if len(suffixes) >= 2 and suffixes[-1] == ".gz":
        return suffixes[-2]
    return path.suffix.lower()


def read_text(path: Path) -> str:
    """The file as text: gzip by its magic bytes (not its name), UTF-8 with any byte-order mark dropped."""
    raw = path.read_bytes()
    if raw[:2] == GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(path, None, f"not a readable gzip file ({e})") from None
    # A byte-order mark from spreadsheet exports is dropped, not glued onto the first column name. It is cut off
    # by hand rather than with the utf-8-sig codec, whose error offsets skip the mark and so would misplace the line.
    raw = raw.removeprefix(codecs.BOM_UTF8)
    encoding = ENCODING.get()
    try:
        return raw.decode(encoding)
    except LookupError:
        raise DataError(path, None, f"unknown text encoding '{encoding}' (data.encoding)") from None
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        name = "UTF-8" if codecs.lookup(encoding).name == "utf-8" else encoding
        raise DataError(path, f"line {line}", f"not valid {name} (byte 0x{raw[e.start]:02x}); re-save the file "
                                              f"as UTF-8, or set data.encoding (e.g. latin-1)") from None


def numbered_lines(path: Path, text: str):
    """(line number, line) pairs, without line ends; raises DataError for a line over MAX_LINE_CHARS.

    Splits on '\\n' only: str.splitlines() also breaks at U+2028, form feeds and other characters that are
    legal inside a JSON string or a sentence, which would cut a record in two and shift every later line number.
    """
    # Files from classic Mac OS end lines with a bare '\r'; anything else keeps '\r' as ordinary text.
    lines = text.split("\r") if "\n" not in text and "\r" in text else text.split("\n")
    if lines[-1] == "":  # the newline that ends the last line does not start another
        lines.pop()
    for number, line in enumerate(lines, start=1):
        if len(line) > MAX_LINE_CHARS:
            raise DataError(path, f"line {number}", f"the line is {len(line):,} characters long; the limit is "
                                                    f"{MAX_LINE_CHARS:,} (a binary file, or no line breaks?)")
        yield number, line.removesuffix("\r")
