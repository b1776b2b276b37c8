"""From files to clean train/validation/test examples: column mapping, label names, seeded stratified splits.

An example is a plain dict of template fields (text, label, ...) plus '_where', its source location, so that
any later problem (a template that fails, a sample too long) can still name the file and line.
"""
from __future__ import annotations

import math
import random
from collections import defaultdict
from dataclasses import dataclass, field

from tailorlm.config import DataSpec
from tailorlm.data.sources import Table, read_table
from tailorlm.errors import DataError, did_you_mean

Example = dict  # template fields + '_where'
SPLITS = ("train", "validation", "test")


@dataclass
class Splits:
    train: list[Example]
    validation: list[Example]
    test: list[Example]
    labels: list[str]  # the label set, in a stable order, as the model should answer
    sources: dict[str, str] = field(default_factory=dict)  # split -> where it came from

    def __getitem__(self, name: str) -> list[Example]:
        return getattr(self, name)


def load_splits(spec: DataSpec, needed_fields: set[str], label_field: str = "label") -> Splits:
    """Read the configured files, map columns to template fields, split and subsample, all seeded."""
    tables = {name: read_table(getattr(spec, name), spec.format) for name in SPLITS if getattr(spec, name)}
    examples = {name: _to_examples(table, spec, needed_fields, label_field) for name, table in tables.items()}
    sources = {name: table.path for name, table in tables.items()}

    missing = [name for name in ("validation", "test") if name not in examples]
    if missing:
        shares = [getattr(spec.split, name) for name in missing]
        if sum(shares) >= 0.9:
            raise DataError(tables["train"].path, None, f"data.split leaves too little for training ({shares})")
        parts = split_stratified(examples["train"], shares, spec.split.seed, label_field if spec.split.stratify else None)
        examples["train"] = parts[0]
        for name, part in zip(missing, parts[1:]):
            examples[name] = part
            sources[name] = f"{tables['train'].path} (split {getattr(spec.split, name):.0%}, seed {spec.split.seed})"

    for name in SPLITS:
        limit = getattr(spec.limit, name)
        if limit and len(examples[name]) > limit:
            examples[name] = sample_stratified(examples[name], limit, spec.split.seed,
                                               label_field if spec.split.stratify else None)
        if not examples[name]:
            raise DataError(sources[name], None, f"the {name} split is empty")

    order = list(dict.fromkeys(spec.label_names.values()))
    seen = sorted({ex[label_field] for name in SPLITS for ex in examples[name]} - set(order))
    return Splits(examples["train"], examples["validation"], examples["test"], order + seen, sources)


def _to_examples(table: Table, spec: DataSpec, needed: set[str], label_field: str) -> list[Example]:
    columns = table.columns
    mapping = {f: spec.columns.get(f, f) for f in needed | set(spec.columns)}
    for field_name, column in mapping.items():
        if column not in columns:
            hint = did_you_mean(column, columns)
            how = "" if field_name == column else f" (mapped from template field '{field_name}')"
            raise DataError(table.path, None, f"no column '{column}'{how}{hint}; the columns are: {', '.join(columns)}")
    label_names = {str(k): v for k, v in spec.label_names.items()}
    examples, label_types = [], {}
    for record in table.records:
        ex: Example = {"_where": f"{table.path}, {record.where}"}
        for field_name, column in mapping.items():
            value = record.fields.get(column)
            # NaN is how pandas-made JSON and Parquet files spell a missing cell.
            if value is None or (isinstance(value, str) and not value.strip()) or (isinstance(value, float) and math.isnan(value)):
                raise DataError(table.path, record.where, f"empty value in column '{column}'")
            # Only scalars have one obvious text form for a template; str() of a dict, list or bytes would train
            # the model on Python reprs.
            if not isinstance(value, (str, int, float, bool)):
                raise DataError(table.path, record.where, f"column '{column}' holds a {type(value).__name__}, expected text or a number")
            if field_name == label_field:
                label_types.setdefault(type(value).__name__, record.where)
            ex[field_name] = value if isinstance(value, str) else _scalar_text(value)
        if label_field in ex:
            raw = ex[label_field].strip()
            if label_names and raw not in label_names:
                raise DataError(table.path, record.where, f"label '{raw}' is not in data.label_names "
                                                          f"(known: {', '.join(label_names)})")
            ex[label_field] = label_names.get(raw, raw)
        examples.append(ex)
    if len(label_types) > 1:
        first, second = list(label_types.items())[:2]
        raise DataError(table.path, second[1], f"mixed label types: {first[0]} (first at {first[1]}) and {second[0]}; "
                                               f"use one type for every label")
    return examples


def _scalar_text(value) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _groups(examples: list[Example], key: str | None) -> list[list[Example]]:
    if key is None:
        return [list(examples)]
    groups: dict[str, list[Example]] = defaultdict(list)
    for ex in examples:
        groups[ex[key]].append(ex)
    return [groups[k] for k in sorted(groups)]


def split_stratified(examples: list[Example], shares: list[float], seed: int, key: str | None) -> list[list[Example]]:
    """[rest, share_1 part, share_2 part, ...]; each label keeps its proportion in every part."""
    rng = random.Random(seed)
    parts: list[list[Example]] = [[] for _ in range(len(shares) + 1)]
    for group in _groups(examples, key):
        group = group[:]
        rng.shuffle(group)
        start = 0
        for i, share in enumerate(shares, start=1):
            n = round(len(group) * share)
            parts[i].extend(group[start:start + n])
            start += n
        parts[0].extend(group[start:])
    for part in parts:
        rng.shuffle(part)
    return parts


def sample_stratified(examples: list[Example], n: int, seed: int, key: str | None) -> list[Example]:
    """n examples with label proportions kept (largest remainders), deterministic for a seed."""
    rng = random.Random(seed + 1)
    groups = _groups(examples, key)
    quotas = [len(g) * n / len(examples) for g in groups]
    counts = [int(q) for q in quotas]
    for i in sorted(range(len(groups)), key=lambda i: quotas[i] - counts[i], reverse=True)[: n - sum(counts)]:
        counts[i] += 1
    chosen = []
    for group, count in zip(groups, counts):
        chosen.extend(rng.sample(group, count))
    rng.shuffle(chosen)
    return chosen
