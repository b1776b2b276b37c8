"""From files to clean train/validation/test examples: column mapping, label names, seeded stratified splits.

An example is a plain dict of template fields (text, label, ...) plus '_where', its source location, so that
any later problem (a template that fails, a sample too long) can still name the file and line.
"""
from __future__ import annotations

import math
import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Mapping

from tailorlm.config import DataSpec
from tailorlm.data.formats import chat_fields
from tailorlm.data.preferences import EXTRA_KEYS, is_preference, preference_fields
from tailorlm.data.records import Record, Table
from tailorlm.data.sources import read_splits
from tailorlm.errors import DataError, did_you_mean
from tailorlm.tasks import TASKS, Task

Example = dict  # template fields + '_where'
SPLITS = ("train", "validation", "test")


@dataclass
class Splits:
    train: list[Example]
    validation: list[Example]
    test: list[Example]
    labels: list[str]  # the label set, in a stable order, as the model should answer
    sources: dict[str, str] = field(default_factory=dict)  # split -> where it came from
    skipped: dict[str, dict[str, int]] = field(default_factory=dict)  # file split -> {reason: rows} (skip_bad_rows)

    def __getitem__(self, name: str) -> list[Example]:
        return getattr(self, name)


def load_splits(spec: DataSpec, needed_fields: set[str], label_field: str | None = "label",
                task: Task = TASKS["classification"], given: Mapping[str, object] | None = None,
                preference: str | None = None) -> Splits:
    """Read the configured sources, map columns to template fields, split and subsample, all seeded.

    label_field is the closed answer set to stratify by (classification), or None. `given` maps NAME to the
    object (DataFrame, list of dicts, Dataset, DatasetDict) that a memory:NAME source names. preference: 'pairs'
    or 'unpaired' (kto) under a preference objective: every training record must be one (data/preferences.py),
    held-out records may be one or a plain task row."""
    tables = read_splits({name: getattr(spec, name) for name in SPLITS}, spec.format, spec.encoding, given)
    skipped = {name: Counter() for name in tables}
    examples = {name: to_examples(table, spec, needed_fields, label_field, task, skipped[name],
                                  preference, required=name == "train")
                for name, table in tables.items()}
    sources = {name: table.path for name, table in tables.items()}

    missing = [name for name in ("validation", "test") if name not in examples]
    if missing:
        shares = [getattr(spec.split, name) for name in missing]
        if sum(shares) >= 0.9:
            raise DataError(tables["train"].path, None, f"data.split leaves too little for training ({shares})")
        key = label_field if spec.split.stratify else None
        parts = split_stratified(examples["train"], shares, spec.split.seed, key)
        examples["train"] = parts[0]
        for name, part in zip(missing, parts[1:]):
            examples[name] = part
            sources[name] = f"{tables['train'].path} (split {getattr(spec.split, name):.0%}, seed {spec.split.seed})"

    if spec.empty_share is not None:
        if "entities" not in task.structured:
            raise DataError(sources["train"], None, "data.empty_share applies to extraction tasks (template.preset: ner)")
        examples["train"], dropped = cap_empty(examples["train"], spec.empty_share, spec.split.seed)
        if dropped:
            skipped["train"][f"no entity, beyond data.empty_share={spec.empty_share:g}"] += dropped

    for name in SPLITS:
        limit = getattr(spec.limit, name)
        if limit and len(examples[name]) > limit:
            examples[name] = sample_stratified(examples[name], limit, spec.split.seed,
                                               label_field if spec.split.stratify else None)
        if not examples[name]:
            raise DataError(sources[name], None, f"the {name} split is empty")

    if label_field is None:  # open answers; extraction tasks still name their entity types
        labels = task.answer_set([ex for name in SPLITS for ex in examples[name]])
    else:
        words, _ = label_words(spec, tables["train"], spec.columns.get(label_field, label_field))
        order = list(dict.fromkeys(words.values()))
        labels = order + sorted({ex[label_field] for name in SPLITS for ex in examples[name]} - set(order))
    return Splits(examples["train"], examples["validation"], examples["test"], labels, sources,
                  {name: dict(c) for name, c in skipped.items() if c})


def cap_empty(examples: list[Example], share: float, seed: int) -> tuple[list[Example], int]:
    """Keep entity-free examples up to `share` of the result (a seeded choice, order kept); returns (kept,
    number dropped)."""
    empty = [i for i, ex in enumerate(examples) if not ex["entities"]]
    allowed = math.floor(share / (1 - share) * (len(examples) - len(empty)))
    if len(empty) <= allowed:
        return examples, 0
    drop = set(random.Random(seed).sample(empty, len(empty) - allowed))
    return [ex for i, ex in enumerate(examples) if i not in drop], len(drop)


def to_examples(table: Table, spec: DataSpec, needed: set[str], label_field: str | None, task: Task,
                skipped: Counter, preference: str | None = None, required: bool = False) -> list[Example]:
    """A table's rows as template examples: columns mapped to fields, chat records to single turns, values
    checked, with the file and line in every error. Training, retention and `tailor predict` all read rows
    through this one function. Rows skipped under data.skip_bad_rows are counted in `skipped` by reason."""
    if preference:
        table = _preference_table(table, preference == "unpaired", task.conversational, required)
    columns = table.columns
    needed = (needed - task.derived) | (task.structured if needed & task.derived else set())
    mapping = {f: spec.columns.get(f, f) for f in needed | set(spec.columns)}
    from_messages = not task.conversational and "messages" in columns and any(c not in columns for c in mapping.values())
    if from_messages:  # OpenAI / ShareGPT records: instruction and output come from the conversation
        columns = [c for c in columns if c != "messages"] + ["instruction", "input", "output"]
    for field_name, column in mapping.items():
        if column not in columns and not (field_name in task.optional and field_name in task.structured):
            hint = did_you_mean(column, columns)
            how = "" if field_name == column else f" (mapped from template field '{field_name}')"
            raise DataError(table.path, None, f"no column '{column}'{how}{hint}; the columns are: {', '.join(columns)}")
    label_names = label_words(spec, table, mapping[label_field]) if label_field in mapping else ({}, "")
    examples, label_types = [], {}
    for record in table.records:
        try:
            ex = _to_example(record, table.path, mapping, label_field, label_names, task, from_messages, needed)
        except DataError as e:
            if not spec.skip_bad_rows:
                raise
            skipped[e.problem] += 1  # reported per reason, never silently
            continue
        if label_field in mapping:  # the raw value's type: a file that mixes 1 and "1" is an error below
            label_types.setdefault(type(record.fields.get(mapping[label_field])).__name__, record.where)
        examples.append(ex)
    if len(label_types) > 1:
        first, second = list(label_types.items())[:2]
        raise DataError(table.path, second[1], f"mixed label types: {first[0]} (first at {first[1]}) and {second[0]}; "
                                               f"use one type for every label")
    return examples


def _preference_table(table: Table, unpaired: bool, conversational: bool, required: bool) -> Table:
    """The table with its preference records' answers as task fields (data/preferences.py)."""
    records = []
    for record in table.records:
        if is_preference(record.fields, unpaired):
            fields = preference_fields(record.fields, table.path, record.where, conversational, unpaired)
            records.append(Record(fields, record.where))
        elif required:
            wanted = "'completion' and a true/false 'label' (or 'kto_tag')" if unpaired else "'chosen' and 'rejected'"
            raise DataError(table.path, record.where, f"not a preference record: a preference objective trains on "
                                                      f"records with {wanted}; found keys: {', '.join(record.fields)}")
        else:
            records.append(record)
    return Table(table.path, records, table.class_names)


def label_words(spec: DataSpec, table: Table, column: str) -> tuple[dict[str, str], str]:
    """(raw label value -> the word the model answers, where that mapping comes from), for the label column.

    data.label_names when given; else, for a Hugging Face ClassLabel column (ag_news, imdb, ...) whose values
    are indices into its class names, those names: the words a user expects the model to answer, rather than
    '0', '1', '2'. Empty otherwise (the values are the words)."""
    if spec.label_names:
        return {str(k): v for k, v in spec.label_names.items()}, "data.label_names"
    if names := table.class_names.get(column):
        return {str(i): name for i, name in enumerate(names)}, f"the class names of column '{column}'"
    return {}, ""


def _to_example(record, path: str, mapping: dict[str, str], label_field: str | None,
                label_names: tuple[dict[str, str], str], task: Task, from_messages: bool, needed: set[str]) -> Example:
    ex: Example = {"_where": f"{path}, {record.where}"}
    fields = {**record.fields, **_single_turn(record, path)} if from_messages else record.fields
    if task.conversational:  # checked and normalised as the chat readers do, whatever format held them
        key = "conversations" if mapping["messages"] == "conversations" else "messages"  # ShareGPT's name
        chat = chat_fields({key: fields.get(mapping["messages"]), "tools": fields.get(mapping.get("tools", "tools"))},
                           path, record.where, required=True)
        fields = {**fields, "tools": None, **chat}
        mapping = {**mapping, "messages": "messages", "tools": "tools"}
    for field_name, column in mapping.items():
        value = fields.get(column)
        if field_name in task.optional and field_name in task.structured and value is None:
            ex[field_name] = []
            continue
        if field_name in task.structured:
            if not isinstance(value, list):
                raise DataError(path, record.where, f"column '{column}' must hold a list, got {type(value).__name__}")
            ex[field_name] = value
            continue
        # NaN is how pandas-made JSON and Parquet files spell a missing cell.
        if value is None or (isinstance(value, str) and not value.strip()) or (isinstance(value, float) and math.isnan(value)):
            if field_name in task.optional:
                ex[field_name] = ""
                continue
            raise DataError(path, record.where, f"empty value in column '{column}'")
        # Only scalars have one obvious text form for a template; str() of a dict, list or bytes would train
        # the model on Python reprs.
        if not isinstance(value, (str, int, float, bool)):
            raise DataError(path, record.where, f"column '{column}' holds a {type(value).__name__}, expected text or a number")
        ex[field_name] = value if isinstance(value, str) else _scalar_text(value)
    tokens, tags = fields.get("tokens"), fields.get("tags")
    if "entities" in task.structured and isinstance(tokens, list) and isinstance(tags, list):
        # a token dataset's own tokens and BIO tags: strict span scoring and the CRF read them as they are,
        # rather than rebuilding them from the entities' text
        ex["tokens"], ex["tags"] = list(tokens), list(tags)
    ex.update(task.derive(ex) if needed & task.structured else {})
    ex.update({key: fields[key] for key in EXTRA_KEYS if key in fields})  # a preference record's answers
    if label_field and label_field in ex:
        raw = ex[label_field].strip()
        words, origin = label_names
        if words and raw not in words:
            raise DataError(path, record.where, f"label '{raw}' is not in {origin} (known: {', '.join(words)})")
        ex[label_field] = words.get(raw, raw)
    return ex


def _single_turn(record, path) -> dict:
    """instruction/input/output of a one-exchange conversation (a system turn is kept as context in input)."""
    turns = record.fields["messages"]
    system = [m["content"] for m in turns if m["role"] == "system"]
    rest = [m for m in turns if m["role"] != "system"]
    if len(rest) != 2 or rest[0]["role"] != "user" or rest[1]["role"] != "assistant" or rest[1].get("tool_calls"):
        raise DataError(path, record.where, f"a conversation of {len(rest)} turns besides the system's; the "
                                            f"instruction preset trains on one user turn and one plain assistant "
                                            f"answer (template.preset=chat trains on whole conversations, tool "
                                            f"calls included)")
    return {"instruction": rest[0]["content"], "input": "\n".join(system), "output": rest[1]["content"]}


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
