"""Hugging Face datasets as sources: `hf:NAME[:CONFIG][@SPLIT]` from the hub, folders written by
Dataset.save_to_disk or DatasetDict.save_to_disk (`folder@SPLIT` picks a split), and single .arrow files.

Nothing here runs or unpickles what comes with a dataset. load_dataset is never given trust_remote_code, and
datasets 5 refuses loading scripts outright and no longer unpickles in its pandas builder. load_from_disk reads
JSON (dataset_info.json, state.json, dataset_dict.json) and Arrow files only, the features included (Arrow
schema metadata, JSON); a folder that holds a pickle file anyway is refused before anything in it is read.
`datasets` is imported only once such a source is used: it costs every CLI start seconds otherwise.

Rows become the Records the file readers produce, each `where` 'row N' (counted from 1) in a Table whose
path names the dataset and the split, so every later message (an empty value, an unknown label, a missing
column) points at the row.
"""
from __future__ import annotations

import sys
from pathlib import Path

from tailorlm.data.formats import bio_entities
from tailorlm.data.records import Record, Table, source_error
from tailorlm.errors import DataError, did_you_mean

HF_PREFIX = "hf:"
# The split each role takes from a DatasetDict when no @SPLIT names one, in order of preference.
ROLE_SPLITS = {"train": ("train",), "validation": ("validation", "valid", "dev"), "test": ("test",)}
PICKLE_SUFFIXES = (".pkl", ".pickle")
SAVED_MARKERS = ("state.json", "dataset_dict.json")  # what save_to_disk writes for a Dataset / a DatasetDict
NO_LABEL = -1  # a ClassLabel value meaning 'no label', as in the GLUE test splits
TAG_COLUMNS = ("ner_tags", "tags")  # the BIO tag column of a token dataset (conll2003 also has chunk_tags)


def hub_tables(source: str, field: str | None, role: str, extra: tuple[str, ...]) -> dict[str, Table]:
    """'hf:NAME[:CONFIG][@SPLIT]' through datasets.load_dataset: the split named, or the role's split of the
    DatasetDict (and, for `extra` roles, theirs when present)."""
    name_config, _, split = source[len(HF_PREFIX):].partition("@")
    name, _, config = name_config.partition(":")
    if not name.strip():
        raise source_error(field, source, "names no dataset; expected hf:NAME[:CONFIG][@SPLIT], e.g. hf:ag_news@test")
    import datasets

    try:
        loaded = datasets.load_dataset(name, config or None, split=split or None)
    except Exception as e:
        if _unreachable(e):
            where = f"point {field} at that folder" if field else "use that folder instead"
            raise source_error(field, source, f"could not be loaded from the Hugging Face hub ({_first_line(e)}); "
                                              f"download it where the hub is reachable and save it with "
                                              f"Dataset.save_to_disk, then {where}") from None
        if isinstance(e, RuntimeError) and "scripts are no longer supported" in str(e):
            raise source_error(field, source, "is a dataset with a loading script (Python code that comes with "
                                              "it), which is never run; use one stored as Parquet, CSV, JSON or "
                                              "Arrow files") from None
        # No such dataset or config, a private one, an unknown split: datasets' message says which.
        raise source_error(field, source, f"could not be loaded: {_first_line(e)}") from None
    if split:
        return {role: dataset_table(loaded, source)}
    return split_tables(loaded, source, None, role, extra, field)


def split_at(source: str) -> tuple[Path, str | None] | None:
    """(folder, split) for 'folder' or 'folder@SPLIT' naming an existing folder, else None."""
    path = Path(source)
    if path.is_dir():
        return path, None
    base, at, split = source.rpartition("@")
    if at and split and Path(base).is_dir():
        return Path(base), split
    return None


def folder_tables(folder: Path, split: str | None, field: str | None, role: str,
                  extra: tuple[str, ...]) -> dict[str, Table]:
    """A folder written by save_to_disk: a Dataset, or a DatasetDict whose split is picked as for hf: sources."""
    pickles = sorted(p for p in folder.rglob("*") if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise DataError(folder, None, f"holds a pickle file ({pickles[0].relative_to(folder)}), and pickles are "
                                      f"never loaded: reading one can run any code. Keep the dataset as "
                                      f"Dataset.save_to_disk writes it (Arrow and JSON files only)")
    if not any((folder / marker).is_file() for marker in SAVED_MARKERS):
        raise DataError(folder, None, "a folder, but not a dataset saved with Dataset.save_to_disk or "
                                      "DatasetDict.save_to_disk (no state.json or dataset_dict.json in it); "
                                      "name a data file, or such a folder")
    import datasets

    try:
        loaded = datasets.load_from_disk(str(folder))
    except Exception as e:  # a damaged or partly copied folder: several exception types
        raise DataError(folder, None, f"cannot read the saved dataset: {_first_line(e)}") from None
    return split_tables(loaded, str(folder), split, role, extra, field)


def arrow_table(path: Path) -> Table:
    """One .arrow file of a saved dataset (data-00000-of-00001.arrow, or one from the datasets cache)."""
    import datasets

    try:
        dataset = datasets.Dataset.from_file(str(path))
    except Exception as e:  # pyarrow raises several types for files that are not Arrow streams
        raise DataError(path, None, f"cannot read as an Arrow file of a saved dataset: {_first_line(e)}") from None
    return dataset_table(dataset, str(path))


def split_tables(loaded, base: str, split: str | None, role: str, extra: tuple[str, ...], field: str | None,
                 row_word: str = "row") -> dict[str, Table]:
    """The tables a Dataset or DatasetDict gives: the split named (base@SPLIT), else the role's own split, and
    for each of `extra` (validation/test the config leaves out) its split when present and labelled. A split
    picked by its name says so in the table's path: 'data/ag_news (split 'test')'."""
    if not is_dataset_dict(loaded):
        if split:
            raise source_error(field, f"{base}@{split}", f"names a split, but {base} is one Dataset, not a "
                                                          f"DatasetDict of splits; drop '@{split}'")
        return {role: dataset_table(loaded, base, row_word)}
    if split:
        if split not in loaded:
            raise source_error(field, f"{base}@{split}", f"has no split '{split}'{did_you_mean(split, loaded)}; "
                                                          f"its splits are: {', '.join(loaded)}")
        return {role: dataset_table(loaded[split], f"{base}@{split}", row_word)}
    own = next((name for name in ROLE_SPLITS[role] if name in loaded), None)
    if own is None:
        raise source_error(field, base, f"holds the splits {', '.join(loaded)}, none of them "
                                        f"{' or '.join(repr(n) for n in ROLE_SPLITS[role])}; name one as "
                                        f"{base}@{next(iter(loaded), 'SPLIT')}")
    names = {role: own, **{r: s for r, s in role_splits(loaded, extra).items() if s != own}}
    return {r: dataset_table(loaded[name], f"{base} (split '{name}')", row_word) for r, name in names.items()}


def role_splits(dataset_dict, roles) -> dict[str, str]:
    """Role -> the DatasetDict split it takes by name. A split without labels (every ClassLabel value -1, as in
    the GLUE test sets) is passed over: measuring on it is impossible, and splitting off training data is not."""
    import datasets

    picked = {}
    for role in roles:
        for name in ROLE_SPLITS[role]:
            if name not in dataset_dict:
                continue
            part = dataset_dict[name]
            labels = [c for c, f in part.features.items() if isinstance(f, datasets.ClassLabel)]
            if len(part) and labels and all(set(part.unique(c)) == {NO_LABEL} for c in labels):
                continue
            picked[role] = name
            break
    return picked


def is_dataset(obj) -> bool:
    """A datasets.Dataset, told without importing datasets: an object can only be one once it is imported."""
    module = sys.modules.get("datasets")
    return module is not None and isinstance(obj, module.Dataset)


def is_dataset_dict(obj) -> bool:
    module = sys.modules.get("datasets")
    return module is not None and isinstance(obj, module.DatasetDict)


def dataset_table(dataset, path: str, row_word: str = "row") -> Table:
    """A Dataset's rows as Records, `where` '<row_word> N' counted from 1.

    A ClassLabel column keeps its indices, its names going into Table.class_names; a list of ClassLabel (the
    tags of a token dataset) becomes the tag names. A dataset with 'tokens' and BIO tags (conll2003, wnut_17)
    also gets the 'text' and 'entities' fields the CoNLL reader gives, so the ner preset reads it as is."""
    import datasets

    dataset = dataset.with_format(None)  # one saved with a torch or numpy format would give tensors and arrays
    class_names, tag_names = {}, {}
    for column, feature in dataset.features.items():
        if isinstance(feature, datasets.ClassLabel):
            class_names[column] = list(feature.names)
        elif isinstance(getattr(feature, "feature", None), datasets.ClassLabel):
            tag_names[column] = list(feature.feature.names)
    tag_column = next((c for c in TAG_COLUMNS if c in tag_names and _bio(tag_names[c])), None)
    columns = set(dataset.column_names)
    spans = tag_column is not None and "tokens" in columns and not {"text", "entities"} & columns
    records = []
    for number, row in enumerate(dataset.to_list(), start=1):
        for column in class_names:
            if row[column] == NO_LABEL:
                row[column] = None  # read as an empty cell: reported, or skipped under data.skip_bad_rows
        for column, names in tag_names.items():
            if isinstance(row[column], list):
                row[column] = [names[t] if 0 <= t < len(names) else t for t in row[column]]
        if spans and isinstance(row["tokens"], list) and isinstance(row[tag_column], list):
            row["text"] = " ".join(row["tokens"])
            row["entities"] = bio_entities(row["tokens"], row[tag_column])
            row["tags"] = row[tag_column]  # the gold BIO tags, which strict span scoring reads
        records.append(Record(row, f"{row_word} {number}"))
    if not records:
        raise DataError(path, None, "no rows (the dataset is empty)")
    return Table(path, records, class_names)


def _bio(names: list[str]) -> bool:
    return all(n == "O" or (n[:2] in ("B-", "I-") and len(n) > 2) for n in names)


def _unreachable(error: Exception) -> bool:
    """The hub could not be reached: offline (HF_HUB_OFFLINE=1, or no network: datasets raises ConnectionError
    for both), a timeout, or a network error of the HTTP library. 'No such dataset' is a FileNotFoundError."""
    if isinstance(error, OSError) and not isinstance(error, (FileNotFoundError, PermissionError)):
        return True
    return type(error).__module__.split(".")[0] in ("httpx", "httpcore", "requests", "urllib3")


def _first_line(error: Exception) -> str:
    """An exception's message on one line: datasets' messages run over several, with advice for its own API."""
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0].rstrip(".")
