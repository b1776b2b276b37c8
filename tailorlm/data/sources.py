"""Readers: turn a data file into records, each remembering where it came from (file + line/row).

Every reader either returns clean records or raises DataError naming the file, the line or row, and
the problem. Nothing is skipped silently.
"""
from __future__ import annotations

import codecs
import contextvars
import csv
import gzip
import io
import json
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tailorlm.data import parse_checks
from tailorlm.errors import DataError

BUILTIN_PREFIX = "builtin:"
# The text encoding of the table being read (data.encoding). A context variable rather than a parameter of
# every reader: only read_text needs it.
ENCODING = contextvars.ContextVar("encoding", default="utf-8")
PAIR_SEPARATOR = "|"  # 'train.en|train.de': the two sides of a parallel corpus
# A line this long is nearly always a binary file, a file with no line breaks, or an unclosed quote that swallowed
# the rest of the file; stopping early names the line instead of building one giant sample.
MAX_LINE_CHARS = 1_000_000
GZIP_MAGIC = b"\x1f\x8b"

# The csv module's own field limit (131,072 by default) would reject fields that MAX_LINE_CHARS allows,
# with a less helpful message; only ever raised, in case the host program set it higher.
csv.field_size_limit(max(csv.field_size_limit(), MAX_LINE_CHARS))


@dataclass
class Record:
    fields: dict[str, Any]
    where: str  # "line 12", "row 5", or a file for one-file-per-sample corpora


@dataclass
class Table:
    path: str
    records: list[Record]

    @property
    def columns(self) -> list[str]:
        return list(self.records[0].fields) if self.records else []


FORMAT_BY_SUFFIX = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json",
                    ".parquet": "parquet", ".pq": "parquet", ".txt": "label_text",
                    ".conll": "conll", ".bio": "conll", ".iob": "conll"}
FORMATS = ("csv", "tsv", "jsonl", "json", "parquet", "label_text", "conll", "parallel", "chat")


def read_table(source: str, fmt: str = "auto", encoding: str = "utf-8") -> Table:
    """Read a file (or builtin:NAME) into a Table; raises DataError with file and line on any problem."""
    token = ENCODING.set(encoding)
    try:
        return _read_table(source, fmt)
    finally:
        ENCODING.reset(token)


def _read_table(source: str, fmt: str) -> Table:
    if source.startswith(BUILTIN_PREFIX):
        from tailorlm.data.builtin import read_builtin

        return read_builtin(source[len(BUILTIN_PREFIX):])
    if fmt == "parallel" or (fmt == "auto" and PAIR_SEPARATOR in source and not Path(source).exists()):
        return formats.read_parallel(source)
    path = Path(source)
    check_file(path)
    if fmt == "auto":
        suffix = _suffix(path)
        fmt = FORMAT_BY_SUFFIX.get(suffix)
        if fmt is None:
            raise DataError(path, None, f"cannot tell the format from the extension '{suffix}'; "
                                        f"set data.format to one of {', '.join(FORMATS)}")
    records = READERS[fmt](path)
    if not records:
        raise DataError(path, None, "no data rows (the file is empty or holds only a header)")
    return Table(str(path), records)


def check_file(path: Path) -> None:
    if not path.is_file():
        raise DataError(path, None, "file not found" if not path.exists() else "not a regular file")


def _suffix(path: Path) -> str:
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


def _read_delimited(path: Path, delimiter: str) -> list[Record]:
    text = read_text(path)
    if len(text) > MAX_LINE_CHARS:  # a shorter file cannot hold an overlong line
        for _ in numbered_lines(path, text):
            pass
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    start = 1
    try:
        header = next(reader, None)
        if header is None:
            return []
        header = [h.strip() for h in header]
        if (problem := parse_checks.repeated_column_problem(header, "header")) is not None:
            raise DataError(path, "line 1", problem)
        records, start = [], reader.line_num + 1
        for row in reader:
            if not row or all(not cell.strip() for cell in row):
                start = reader.line_num + 1
                continue
            if len(row) != len(header):
                raise DataError(path, f"line {start}", f"expected {len(header)} fields ({', '.join(header)}), "
                                                       f"found {len(row)}; check the quoting and delimiter")
            records.append(Record(dict(zip(header, row)), f"line {start}"))
            start = reader.line_num + 1
    except csv.Error as e:
        line, problem = _quote_problem(text, start, reader.line_num, delimiter, str(e))
        raise DataError(path, f"line {line}", f"malformed {'CSV' if delimiter == ',' else 'TSV'}: {problem}") from None
    return records


def _quote_problem(text: str, start: int, stopped: int, delimiter: str, problem: str) -> tuple[int, str]:
    """(line, message) for a csv.Error in the record starting on line `start`, the reader having stopped on line
    `stopped`. A quote that never closes makes the reader run to the end of the file, so the line it names
    is the last one; the line that matters is where the quote opened."""
    if "field larger than field limit" in problem:  # only a quoted field spanning lines gets this far
        return start, (f"a field starting on this line is over {MAX_LINE_CHARS:,} characters long, the limit; "
                       f"an unclosed quote may have swallowed the rest of the file")
    opened = parse_checks.failed_quote_line(text, start, delimiter)
    if opened is None:
        return stopped, problem
    if problem == "unexpected end of data":
        return opened, ("the quote opened on this line never closes, so every later line was read into one "
                        "field; close it, or double a quote that is part of the text (\"\")")
    if opened < stopped:  # text after a closing quote many lines on: that quote was meant to open a field
        return opened, (f"the quote opened on this line only closes on line {stopped}, where text follows it "
                        f"({problem}); is a closing quote missing on this line?")
    return stopped, problem


def _fields(obj: dict, path: Path, where: str, chat_only: bool) -> dict:
    """A JSON record's fields; chat-shaped records (OpenAI, ShareGPT, Alpaca) get normalised 'messages'."""
    fields = formats.chat_fields(obj, path, where, required=chat_only)
    return obj if fields is None else fields


def read_jsonl(path: Path, chat_only: bool = False) -> list[Record]:
    records = []
    for number, line in numbered_lines(path, read_text(path)):
        if not line.strip():
            continue
        try:
            obj = parse_checks.loads_unique(line)
        except json.JSONDecodeError as e:
            raise DataError(path, f"line {number}", f"invalid JSON ({e.msg} at column {e.colno})") from None
        except parse_checks.RepeatedKey as e:
            raise DataError(path, f"line {number}", e.problem) from None
        if not isinstance(obj, dict):
            raise DataError(path, f"line {number}", f"expected a JSON object, found {type(obj).__name__}")
        records.append(Record(_fields(obj, path, f"line {number}", chat_only), f"line {number}"))
    return records


def _read_json(path: Path, chat_only: bool = False) -> list[Record]:
    try:
        obj = parse_checks.loads_unique(read_text(path))
    except json.JSONDecodeError as e:
        raise DataError(path, f"line {e.lineno}", f"invalid JSON ({e.msg} at column {e.colno})") from None
    except parse_checks.RepeatedKey as e:
        raise DataError(path, f"line {e.line}" if e.line else None, e.problem) from None
    if isinstance(obj, dict) and isinstance(obj.get("data"), list):
        obj = obj["data"]
    if not isinstance(obj, list):
        raise DataError(path, None, "expected a JSON list of objects (or {\"data\": [...]})")
    for i, item in enumerate(obj, start=1):
        if not isinstance(item, dict):
            raise DataError(path, f"record {i}", f"expected a JSON object, found {type(item).__name__}")
    return [Record(_fields(item, path, f"record {i}", chat_only), f"record {i}") for i, item in enumerate(obj, start=1)]


def _read_chat(path: Path) -> list[Record]:
    return (_read_json if _suffix(path) == ".json" else read_jsonl)(path, chat_only=True)


def _read_parquet(path: Path) -> list[Record]:
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(path).names
        # Checked before reading: pyarrow refuses a repeated name with a message that does not say which column.
        if (problem := parse_checks.repeated_column_problem(names, "Parquet schema")) is not None:
            raise DataError(path, None, problem)
        rows = pq.read_table(path).to_pylist()
    except DataError:
        raise
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise DataError(path, None, f"cannot read as Parquet: {e}") from None
    return [Record(row, f"row {i}") for i, row in enumerate(rows, start=1)]


def _read_label_text(path: Path) -> list[Record]:
    """'LABEL text' per line, as in SST-2 and TREC distributions."""
    records = []
    for number, line in numbered_lines(path, read_text(path)):
        if not line.strip():
            continue
        label, _, text = line.strip().partition(" ")
        if not text.strip():
            raise DataError(path, f"line {number}", "expected 'LABEL text', found only one word")
        records.append(Record({"label": label, "text": text.strip()}, f"line {number}"))
    return records


# Imported as a module, and used only inside functions, because formats builds on the helpers above: this way
# either module can be imported first.
from tailorlm.data import formats  # noqa: E402

READERS = {
    "csv": lambda p: _read_delimited(p, ","),
    "tsv": lambda p: _read_delimited(p, "\t"),
    "jsonl": read_jsonl,
    "json": _read_json,
    "parquet": _read_parquet,
    "label_text": _read_label_text,
    "conll": lambda p: formats.read_conll(p),
    "chat": _read_chat,
}
