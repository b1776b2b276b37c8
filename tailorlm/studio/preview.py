"""What the studio shows before training: a table's first rows, the rendered samples with the tokens that carry
loss, the token lengths, and the preflight, computed by the same functions `tailor run` and `tailor preflight`
call (pipeline.prepare), so what the page shows is what training will see."""
from __future__ import annotations

import contextlib
import threading
from collections import Counter
from pathlib import Path

from tailorlm.config import RunConfig, TemplateSpec
from tailorlm.data.samples import IGNORE
from tailorlm.data.sources import read_table
from tailorlm.data.templates import PromptTemplate
from tailorlm.ui import console

PRESETS = ("classification", "ner", "qa", "translation", "math", "instruction", "chat")
SHOWN_ROWS = 20
SHOWN_LABELS = 50  # label counts listed on the Data page; a column with more values is hardly a label
SHOWN_SAMPLES = 3
HISTOGRAM_BINS = 20

_tokenizers: dict[str, object] = {}
_tokenizer_lock = threading.Lock()


_quiet = {"depth": 0, "before": False}  # previews in flight, and the console's setting before the first
_quiet_lock = threading.Lock()


@contextlib.contextmanager
def quiet_console():
    """The pipeline reports to the terminal; in the studio the page shows it instead. Counted, not saved and
    put back per call: two previews overlap (the Data page's check and the estimate), and the later one to
    finish would otherwise put back the first one's 'quiet' and silence the studio's terminal for good."""
    with _quiet_lock:
        if _quiet["depth"] == 0:
            _quiet["before"] = console.quiet
            console.quiet = True
        _quiet["depth"] += 1
    try:
        yield
    finally:
        with _quiet_lock:
            _quiet["depth"] -= 1
            if _quiet["depth"] == 0:
                console.quiet = _quiet["before"]


def preset_fields(preset: str) -> list[str]:
    """The fields a preset's default template reads from each row (what the column mapping maps)."""
    template = PromptTemplate(TemplateSpec(preset=preset))
    derived = template.task.derived
    return sorted(f for f in template.fields if f not in derived)


def preset_defaults(preset: str) -> dict[str, str]:
    """The preset's own instruction, prompt and completion: what an empty template field means."""
    task = PromptTemplate(TemplateSpec(preset=preset)).task
    return {"instruction": task.instruction, "prompt": task.prompt, "completion": task.completion}


def table_preview(path: Path, fmt: str = "auto", encoding: str = "utf-8", preset: str = "classification",
                  mapping: dict | None = None) -> dict:
    """The columns and first rows of a data file, read by the reader training uses, with what the Data page
    checks before anything else runs: each template field's column (a mapping to a column the table lacks is a
    problem now, not a failed run later) and, for a label field, how many rows carry each label."""
    with quiet_console():
        table = read_table(str(path), fmt, encoding)
    rows = [[_cell(r.fields.get(c)) for c in table.columns] for r in table.records[:SHOWN_ROWS]]
    mapping = mapping if isinstance(mapping, dict) else {}
    problems, fields = [], {}
    if table.columns and preset in PRESETS and preset != "chat":  # conversations are read by their own layout, not mapped columns
        for field in preset_fields(preset):
            column = mapping.get(field) or field
            fields[field] = column if column in table.columns else None
            if column not in table.columns:
                how = f"is mapped to '{column}', which" if field in mapping else "has no column mapped, and"
                problems.append(f"{field} {how} is not a column of this table: choose its column below")
    label_field = PromptTemplate(TemplateSpec(preset=preset)).label_field if preset in PRESETS else None
    label_column = fields.get(label_field) if label_field else None
    counts = Counter(_cell(r.fields.get(label_column)) for r in table.records) if label_column else None
    return {"columns": table.columns, "rows": rows, "count": len(table.records), "fields": fields,
            "problems": problems, "label_column": label_column,
            "label_counts": dict(counts.most_common(SHOWN_LABELS)) if counts else None,
            "labels": len(counts) if counts else None}


def tokenizer_for(cfg: RunConfig):
    """The model's tokenizer, loaded once per model path (a GGUF file's takes seconds to read)."""
    from tailorlm.models.loading import load_tokenizer

    key = cfg.model.path
    with _tokenizer_lock:
        if key not in _tokenizers:
            _tokenizers[key] = load_tokenizer(cfg.model)
        return _tokenizers[key]


def template_preview(cfg: RunConfig) -> dict:
    """Rendered training samples as (text, carries loss) pieces, the token-length histogram, the preflight
    findings and the estimated training time: everything `tailor preflight` computes."""
    from tailorlm.pipeline import prepare

    tokenizer = tokenizer_for(cfg)
    with quiet_console():
        prepared = prepare(cfg, tokenizer=tokenizer)
    task = next(iter(prepared.tasks.values()))
    train = task.encoded["train"]
    samples = [_pieces(s.input_ids, s.labels, tokenizer) for s in train[:SHOWN_SAMPLES]]
    lengths = [len(s) for s in train]
    facts = task.preflight.facts
    return {"samples": samples, "histogram": _histogram(lengths, cfg.template.max_length),
            "max_length": cfg.template.max_length, "findings": task.preflight.findings,
            "labels": task.labels, "examples": {n: len(task.splits[n]) for n in ("train", "validation", "test")},
            "estimated_train_seconds": facts.get("estimated_train_seconds"),
            "tokens_per_epoch": facts.get("tokens_per_epoch"), "epochs": facts.get("epochs"),
            "lengths": facts.get("train_token_lengths")}


def _pieces(ids: list[int], labels: list[int], tokenizer) -> list[list]:
    """Consecutive tokens of the same kind joined: [[text, carries_loss], ...]."""
    pieces: list[list] = []
    for token, label in zip(ids, labels):
        text, trained = tokenizer.decode([token]), label != IGNORE
        if pieces and pieces[-1][1] == trained:
            pieces[-1][0] += text
        else:
            pieces.append([text, trained])
    return pieces


def _histogram(lengths: list[int], max_length: int) -> dict:
    """Counts of sample lengths in at most HISTOGRAM_BINS equal bins from the shortest to the longest."""
    low, high = min(lengths, default=0), max(lengths, default=0)
    width = max(1, -(-(high - low + 1) // HISTOGRAM_BINS))
    counts = [0] * (-(-(high - low + 1) // width))
    for n in lengths:
        counts[(n - low) // width] += 1
    return {"start": low, "width": width, "counts": counts, "max_length": max_length}


def _cell(value) -> str:
    text = value if isinstance(value, str) else repr(value) if value is not None else ""
    return text if len(text) <= 200 else text[:199] + "…"


def setting_help() -> dict[str, str]:
    """Every setting's description from the run spec itself (dotted key -> text): the help the forms show is the
    text `tailor run` validates against, so it cannot drift from what a setting does."""
    from pydantic import BaseModel

    found: dict[str, str] = {}

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            key = f"{prefix}{name}"
            if field.description:
                found[key] = field.description
            kind = field.annotation
            if isinstance(kind, type) and issubclass(kind, BaseModel):
                walk(kind, f"{key}.")

    walk(RunConfig, "")
    return found
