"""What a task preset is, and the small helpers every task's metrics share.

This module sits at the bottom of the tasks package (and the tasks package near the bottom of tailorlm): the
data layer reads a preset's template and fields, the eval layer calls its scorer, so nothing here may import
from either of them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

Scorer = Callable[[list[str], list[dict], list[str]], tuple[dict, list]]  # (generated, examples, labels)


@dataclass(frozen=True)
class ListAnswer:
    """An answer that lists items of a closed set, which depends on the example (NER: a type and a span of the
    example's words), joined by a separator, or one fixed word when the list is empty. Constrained decoding
    keeps a prompted model's answer inside this language."""
    items: Callable[[dict, list[str]], list[str]]  # (example, labels) -> every item the answer may name
    separator: str
    empty: str
    opening: str = ""  # written before the first item (a JSON list's '[')
    closing: str = ""  # written after the last one (']'); when set, the answer may not end without it


@dataclass(frozen=True)
class SpanAnswer:
    """An answer that is one run of consecutive words of an input field (extractive QA: a span of the context),
    where the data is extractive. Constrained decoding then keeps it one."""
    field: str
    max_words: int = 30  # SQuAD's answers: 97% have at most 10 words, almost none over 30


@dataclass(frozen=True)
class CopyAnswer:
    """An answer that copies the example's tokens in order and marks some runs of them with a type:
    '[John Smith | person] flew to [Paris | location]'. Constrained decoding keeps it a copy of the input."""
    open: str = "["
    between: str = " | "
    close: str = "]"


@dataclass(frozen=True)
class Task:
    name: str
    instruction: str
    prompt: str
    completion: str
    columns: tuple[str, ...]  # metric keys shown in the comparison table; the first is the headline
    score: Scorer
    max_new_tokens: int = 64  # the generation budget when eval.max_new_tokens is not set
    label_field: str | None = None  # a closed answer set (classification): stratified splits, constrained decoding
    optional: frozenset[str] = frozenset()  # fields that may be empty (Alpaca's input, QA's context)
    structured: frozenset[str] = frozenset()  # fields that hold lists (CoNLL entities), not text
    derived: frozenset[str] = frozenset()  # template fields computed by derive(), not read from the data
    derive: Callable[[dict], dict] = field(default=lambda ex: {})
    conversational: bool = False  # examples are whole conversations, rendered by the model's chat template
    list_answer: ListAnswer | None = None  # a list of items from a closed set (NER): constrained decoding applies
    copy_answer: CopyAnswer | None = None  # the input copied with typed marks (NER inline): constrained too
    span_answer: SpanAnswer | None = None  # a span of an input field (extractive QA): constrained when extractive

    @property
    def headline(self) -> str:
        return self.columns[0]

    def answer_set(self, examples: list[dict]) -> list[str]:
        """What the template calls `labels`: the label set, or the entity types for extraction."""
        if self.label_field:
            return sorted({ex[self.label_field] for ex in examples})
        if "entities" in self.structured:
            return sorted({e["type"] for ex in examples for e in ex.get("entities", [])})
        return []


def check_lengths(predictions: list, references: list) -> None:
    # zip would silently drop the tail of the longer list and report a score on fewer examples.
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")


def ratio(num: float, den: float) -> float:
    # A denominator of 0 (no examples, no entities) gives 0.0 rather than an error, so an empty eval shows up
    # as a bad score instead of a crash halfway through a report.
    return num / den if den else 0.0
