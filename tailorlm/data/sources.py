"""From a data source to a Table: the one place that knows every reader and chooses between them.

A source (data.train, data.validation, data.test) is one of:
  a file              its format from data.format, or from its extension (FORMAT_BY_SUFFIX)
  SOURCE|TARGET       two line-aligned files of a parallel corpus
  builtin:NAME        a dataset shipped in a package (builtin.py)
  hf:NAME[:CONFIG][@SPLIT]   a Hugging Face hub dataset (hf.py)
  a folder[@SPLIT]    written by Dataset.save_to_disk or DatasetDict.save_to_disk (hf.py)
  memory:NAME[@SPLIT] data passed in from Python (memory.py)

The readers import records.py (and the JSON readers formats.py, for chat records), never this module, so
nothing imports in a circle and every reader can be read and tested on its own.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

from tailorlm.data import tabular
from tailorlm.data.builtin import read_builtin
from tailorlm.data.formats import read_conll, read_parallel
from tailorlm.data.hf import HF_PREFIX, arrow_table, folder_tables, hub_tables, split_at
from tailorlm.data.memory import MEMORY_PREFIX, memory_tables
from tailorlm.data.records import ENCODING, PAIR_SEPARATOR, Table, check_file, file_suffix
from tailorlm.errors import DataError

BUILTIN_PREFIX = "builtin:"
FORMAT_BY_SUFFIX = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json",
                    ".parquet": "parquet", ".pq": "parquet", ".txt": "label_text",
                    ".conll": "conll", ".bio": "conll", ".iob": "conll", ".arrow": "arrow"}
FORMATS = ("csv", "tsv", "jsonl", "json", "parquet", "label_text", "conll", "parallel", "chat", "arrow")
READERS = {  # the readers of one file into records; parallel (two files) and arrow (a Dataset) are read apart
    "csv": tabular.read_csv,
    "tsv": tabular.read_tsv,
    "jsonl": tabular.read_jsonl,
    "json": tabular.read_json,
    "parquet": tabular.read_parquet,
    "label_text": tabular.read_label_text,
    "conll": read_conll,
    "chat": tabular.read_chat,
}


def read_table(source: str, fmt: str = "auto", encoding: str = "utf-8", given: Mapping[str, object] | None = None,
               field: str | None = None) -> Table:
    """Read one source into a Table; raises DataError with the source and the line or row on any problem.
    A DatasetDict gives its 'train' split unless the source names one (@SPLIT). `given` holds the objects
    memory:NAME sources name; `field` (data.train) is the config field named in whole-source errors."""
    return _read(source, fmt, encoding, given, field, "train", ())["train"]


def read_splits(named: Mapping[str, str | None], fmt: str = "auto", encoding: str = "utf-8",
                given: Mapping[str, object] | None = None) -> dict[str, Table]:
    """The table of each split the config names ({'train': data.train, 'validation': ..., 'test': ...}).

    A DatasetDict (hf:NAME, a saved folder, memory:NAME) that data.train names without @SPLIT gives its 'train'
    split, and also validation and test where the config leaves them out: its 'validation' ('valid', 'dev') and
    'test' splits, when present and labelled. Each table's path says which split it is."""
    tables: dict[str, Table] = {}
    for role, source in named.items():
        if source:
            extra = tuple(r for r in ("validation", "test") if not named.get(r)) if role == "train" else ()
            tables.update(_read(source, fmt, encoding, given, f"data.{role}", role, extra))
    return tables


def _read(source: str, fmt: str, encoding: str, given: Mapping[str, object] | None, field: str | None,
          role: str, extra: tuple[str, ...]) -> dict[str, Table]:
    token = ENCODING.set(encoding)
    try:
        if source.startswith(MEMORY_PREFIX):
            return memory_tables(source, given, field, role, extra)
        if source.startswith(HF_PREFIX):
            return hub_tables(source, field, role, extra)
        if fmt in ("auto", "arrow") and (folder := split_at(source)) is not None:
            return folder_tables(*folder, field, role, extra)
        return {role: _read_file(source, fmt)}
    finally:
        ENCODING.reset(token)


def _read_file(source: str, fmt: str) -> Table:
    if source.startswith(BUILTIN_PREFIX):
        return read_builtin(source[len(BUILTIN_PREFIX):])
    if fmt == "parallel" or (fmt == "auto" and PAIR_SEPARATOR in source and not Path(source).exists()):
        return read_parallel(source)
    path = Path(source)
    check_file(path)
    if fmt == "auto":
        suffix = file_suffix(path)
        fmt = FORMAT_BY_SUFFIX.get(suffix)
        if fmt is None:
            raise DataError(path, None, f"cannot tell the format from the extension '{suffix}'; "
                                        f"set data.format to one of {', '.join(FORMATS)}")
    if fmt == "arrow":
        return arrow_table(path)
    records = READERS[fmt](path)
    if not records:
        raise DataError(path, None, "no data rows (the file is empty or holds only a header)")
    return Table(str(path), records)
