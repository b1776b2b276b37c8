"""Data passed in from Python: a pandas DataFrame, a list of dicts, a datasets.Dataset or DatasetDict.

tailorlm.run(data=...) turns what it is given into `memory:NAME` sources (in_memory_sources) and hands the
objects to load_splits as `given`. The config keeps the string, so a run's recorded config says that its data
came from Python, and a CLI user who resumes such a run is told to pass the data again rather than that a
file called 'memory:train' is missing.

Rows become the Records the file readers produce, `where` 'DataFrame row N', 'list item N' or 'Dataset row N'
(counted from 1) in a Table whose path is the memory: source, so every later message names the split and row.
pandas is never imported here: an object can only be a DataFrame once pandas is loaded, so sys.modules tells.
"""
from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path

from tailorlm.data import parse_checks
from tailorlm.data.hf import dataset_table, is_dataset, is_dataset_dict, role_splits, split_tables
from tailorlm.data.records import Record, Table, source_error
from tailorlm.errors import DataError, TailorError, did_you_mean

MEMORY_PREFIX = "memory:"
SPLITS = ("train", "validation", "test")
KINDS = "a pandas DataFrame, a list of dicts or a datasets.Dataset"


def in_memory_sources(data) -> tuple[dict[str, str | None], dict[str, object]]:
    """(DataSpec field overrides, the `given` mapping for load_splits) for what a notebook passes as data=.

    A DataFrame, a list of dicts or a Dataset is the training data: ({'train': 'memory:train'}, {'train': data}).
    A DatasetDict gives its train, validation and test splits (validation may be called 'valid' or 'dev'; an
    unlabelled test split is left out, so test data is split off the training data instead). A dict
    {'train': ..., 'validation': ..., 'test': ...} gives each split named; a value may also be a file path, and
    None for validation or test means what it means in a config: split it off the training data (the field
    is None, overriding the config's file). None for train is refused: there is nothing to train on, and
    falling back on the config's data.train would train on data the caller did not pass."""
    if is_dataset_dict(data):
        roles = role_splits(data, SPLITS)
        if "train" not in roles:
            raise TailorError(f"data=: the DatasetDict has no 'train' split (its splits: {', '.join(data)}); pass "
                              f"{{'train': data['{next(iter(data), 'SPLIT')}']}} to choose one")
        return {role: f"{MEMORY_PREFIX}data@{split}" for role, split in roles.items()}, {"data": data}
    if isinstance(data, Mapping):
        if not data:
            raise TailorError("data={}: no splits given; pass {'train': ...} (and 'validation', 'test' when you "
                              "have them), or leave data out to use the config's data")
        fields, given = {}, {}
        for role, value in data.items():
            if role not in SPLITS:
                raise TailorError(f"data=: a dict of splits has the keys train, validation and test; got "
                                  f"'{role}'{did_you_mean(str(role), SPLITS)}")
            if value is None:
                if role == "train":
                    raise TailorError("data={'train': None}: None is no training data; give a file path, a "
                                      "DataFrame, a list of dicts or a Dataset, or leave 'train' out to train "
                                      "on the config's data.train")
                fields[role] = None
                continue
            if isinstance(value, (str, Path)):
                fields[role] = str(value)
                continue
            _check_kind(value, f"data['{role}']", allow_dict=False)
            fields[role], given[role] = f"{MEMORY_PREFIX}{role}", value
        return fields, given
    _check_kind(data, "data=", allow_dict=True)
    return {"train": f"{MEMORY_PREFIX}train"}, {"train": data}


def memory_tables(source: str, given: Mapping[str, object] | None, field: str | None, role: str,
                  extra: tuple[str, ...]) -> dict[str, Table]:
    """'memory:NAME[@SPLIT]': the object passed under NAME, as a table (a DatasetDict's split picked as for
    saved folders: @SPLIT, else the role's own, plus `extra` roles' splits when present)."""
    name, at, split = source[len(MEMORY_PREFIX):].partition("@")
    if not given or name not in given:
        if given:  # data was passed, under other names: a config that names the wrong one
            raise source_error(field, source, f"names no data passed in Python{did_you_mean(name, given)}; "
                                              f"passed: {', '.join(f'{MEMORY_PREFIX}{n}' for n in given)}")
        target = field or "data.train"
        raise source_error(field, source, f"is data that was passed in Python (tailorlm.run(data=...)); pass it "
                                          f"again from Python, or save it to a file and point {target} at it")
    obj = given[name]
    if is_dataset_dict(obj) or is_dataset(obj):
        return split_tables(obj, f"{MEMORY_PREFIX}{name}", split if at else None, role, extra, field, "Dataset row")
    if at:
        raise source_error(field, source, f"names a split, but the data passed as '{name}' is one "
                                          f"{_kind(obj) or type(obj).__name__}; drop '@{split}'")
    return {role: memory_table(obj, source)}


def memory_table(obj, path: str) -> Table:
    """A DataFrame, list of dicts or Dataset as a Table whose errors name `path` and the row."""
    kind = _kind(obj)
    if kind == "Dataset":
        return dataset_table(obj, path, "Dataset row")
    if kind == "DataFrame":
        columns = [str(c) for c in obj.columns]
        # A repeated name would make to_dict keep one column's values and drop the other's without a word.
        if (problem := parse_checks.repeated_column_problem(columns, "DataFrame's columns")) is not None:
            raise DataError(path, None, problem)
        # to_dict gives Python values; a missing cell is NaN or None, read as an empty CSV cell is.
        rows = obj.to_dict("records")
        records = [Record({str(k): v for k, v in row.items()}, f"DataFrame row {i}") for i, row in enumerate(rows, 1)]
    elif kind == "list":
        records = []
        for i, item in enumerate(obj, start=1):
            if not isinstance(item, Mapping):
                raise DataError(path, f"list item {i}", f"expected a dict (one row), found {type(item).__name__}")
            records.append(Record({str(k): v for k, v in item.items()}, f"list item {i}"))
    elif kind == "DatasetDict":
        raise DataError(path, None, f"a DatasetDict of splits ({', '.join(obj)}); pass one, e.g. data['test']")
    else:
        raise DataError(path, None, f"expected {KINDS}, got {type(obj).__name__}")
    if not records:
        raise DataError(path, None, f"no rows (the {kind} is empty)")
    return Table(path, records)


def _kind(obj) -> str | None:
    pandas = sys.modules.get("pandas")
    if pandas is not None and isinstance(obj, pandas.DataFrame):
        return "DataFrame"
    if is_dataset(obj):
        return "Dataset"
    if is_dataset_dict(obj):
        return "DatasetDict"
    if isinstance(obj, (list, tuple)):
        return "list"
    return None


def _check_kind(obj, what: str, allow_dict: bool) -> None:
    kind = _kind(obj)
    if kind is None or (kind == "DatasetDict" and not allow_dict):
        more = ", a DatasetDict, or a dict of them by split (train, validation, test)" if allow_dict else ""
        raise TailorError(f"{what}: expected {KINDS}{more}; got {'a DatasetDict' if kind else type(obj).__name__}")
