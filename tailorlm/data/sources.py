"""Readers: turn a data file into records, each remembering where it came from (file + line/row).

Every reader either returns clean records or raises DataError naming the file, the line or row, and
the problem. Nothing is skipped silently.
"""
from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tailorlm.errors import DataError

BUILTIN_PREFIX = "builtin:"


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
                    ".parquet": "parquet", ".pq": "parquet", ".txt": "label_text"}


def read_table(source: str, fmt: str = "auto") -> Table:
    """Read a file (or builtin:NAME) into a Table; raises DataError with file and line on any problem."""
    if source.startswith(BUILTIN_PREFIX):
        from tailorlm.data.builtin import read_builtin

        return read_builtin(source[len(BUILTIN_PREFIX):])
    path = Path(source)
    if not path.is_file():
        raise DataError(path, None, "file not found" if not path.exists() else "not a regular file")
    if fmt == "auto":
        fmt = FORMAT_BY_SUFFIX.get(path.suffix.lower())
        if fmt is None:
            raise DataError(path, None, f"cannot tell the format from the extension '{path.suffix}'; "
                                        f"set data.format to one of csv, tsv, jsonl, json, parquet, label_text")
    records = READERS[fmt](path)
    if not records:
        raise DataError(path, None, "no data rows (the file is empty or holds only a header)")
    return Table(str(path), records)


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        # utf-8-sig: a byte-order mark from spreadsheet exports is dropped, not glued onto the first column name.
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(path, f"line {line}", f"not valid UTF-8 (byte 0x{raw[e.start]:02x}); "
                                              f"re-save the file as UTF-8") from None


def _read_delimited(path: Path, delimiter: str) -> list[Record]:
    text = _read_text(path)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    try:
        header = next(reader, None)
        if header is None:
            return []
        header = [h.strip() for h in header]
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
        raise DataError(path, f"line {reader.line_num}", f"malformed {'CSV' if delimiter == ',' else 'TSV'}: {e}") from None
    return records


def _read_jsonl(path: Path) -> list[Record]:
    records = []
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(path, f"line {number}", f"invalid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise DataError(path, f"line {number}", f"expected a JSON object, found {type(obj).__name__}")
        records.append(Record(obj, f"line {number}"))
    return records


def _read_json(path: Path) -> list[Record]:
    try:
        obj = json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise DataError(path, f"line {e.lineno}", f"invalid JSON ({e.msg} at column {e.colno})") from None
    if isinstance(obj, dict) and isinstance(obj.get("data"), list):
        obj = obj["data"]
    if not isinstance(obj, list):
        raise DataError(path, None, "expected a JSON list of objects (or {\"data\": [...]})")
    for i, item in enumerate(obj, start=1):
        if not isinstance(item, dict):
            raise DataError(path, f"record {i}", f"expected a JSON object, found {type(item).__name__}")
    return [Record(item, f"record {i}") for i, item in enumerate(obj, start=1)]


def _read_parquet(path: Path) -> list[Record]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise DataError(path, None, f"cannot read as Parquet: {e}") from None
    return [Record(row, f"row {i}") for i, row in enumerate(rows, start=1)]


def _read_label_text(path: Path) -> list[Record]:
    """'LABEL text' per line, as in SST-2 and TREC distributions."""
    records = []
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        label, _, text = line.strip().partition(" ")
        if not text.strip():
            raise DataError(path, f"line {number}", "expected 'LABEL text', found only one word")
        records.append(Record({"label": label, "text": text.strip()}, f"line {number}"))
    return records


READERS = {
    "csv": lambda p: _read_delimited(p, ","),
    "tsv": lambda p: _read_delimited(p, "\t"),
    "jsonl": _read_jsonl,
    "json": _read_json,
    "parquet": _read_parquet,
    "label_text": _read_label_text,
}
