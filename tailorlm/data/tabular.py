"""Readers for files of rows: CSV, TSV, JSON, JSONL, Parquet and 'LABEL text' lines (plus the chat-only JSON
reader, which is JSON with every record required to be a conversation).

Every reader either returns clean records or raises DataError naming the file, the line or row, and the
problem. Nothing is skipped silently. Which reader reads a file is decided in sources.py.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from tailorlm.data import parse_checks
from tailorlm.data.formats import chat_fields
from tailorlm.data.records import MAX_LINE_CHARS, Record, file_suffix, numbered_lines, read_text
from tailorlm.errors import DataError

# The csv module's own field limit (131,072 by default) would reject fields that MAX_LINE_CHARS allows,
# with a less helpful message; only ever raised, in case the host program set it higher.
csv.field_size_limit(max(csv.field_size_limit(), MAX_LINE_CHARS))


def read_csv(path: Path) -> list[Record]:
    return _read_delimited(path, ",")


def read_tsv(path: Path) -> list[Record]:
    return _read_delimited(path, "\t")


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
    fields = chat_fields(obj, path, where, required=chat_only)
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


def read_json(path: Path, chat_only: bool = False) -> list[Record]:
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


def read_chat(path: Path) -> list[Record]:
    return (read_json if file_suffix(path) == ".json" else read_jsonl)(path, chat_only=True)


def read_parquet(path: Path) -> list[Record]:
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


def read_label_text(path: Path) -> list[Record]:
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
