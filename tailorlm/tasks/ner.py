"""Named-entity extraction: the preset in each answer format (template.entity_format), and its score.

Training targets are rendered by entities.render and generations are read back by entities.parse in the same
format, so the model learns exactly the form the parser expects; the parser is still lenient about spacing,
case and cut-off endings. The headline is strict entity-level F1 (entities.span_scores); `text_f1`, entities
matched as text wherever they stand, is kept beside it. Scores are shares in 0-1, computed on the generated
text, never on token ids.
"""
from __future__ import annotations

import json

from tailorlm.tasks.base import CopyAnswer, ListAnswer, Task
from tailorlm.tasks.entities import (FORMATS, NO_ENTITIES, SEPARATOR, clean_span, entity_scores, example_tokens,
                                     parse, render, span_scores)

# entity_scores is re-exported: the text-matching score (text_f1), which callers knew from here
__all__ = ["TASK", "TASKS", "candidate_entities", "candidate_json_items", "entity_scores", "format_entities",
           "parse_entities"]

# Spans longer than this are not offered to constrained decoding: 99.6% of WNUT-17's training entities have at
# most 8 words (the rest are titles), and each extra word adds a span per word of a long sentence.
MAX_SPAN_WORDS = 8
TYPES = "Types: {{ labels | join(', ') }}."
INSTRUCTIONS = {
    "list": "List the named entities in the text as 'type: entity', separated by semicolons, or answer 'none'. "
            + TYPES,
    "inline": "Copy the text, marking each named entity as [entity | type]. " + TYPES,
    "json": 'List the named entities in the text as a JSON array of {"type": ..., "text": ...} objects, or [] if '
            "there are none. " + TYPES,
}
COLUMNS = ("f1", "precision", "recall", "text_f1")
# Generation budgets: a list names the entities alone; JSON spells each one out; inline copies the whole
# sentence (WNUT-17's longest test tweets take about 150 tokens with their marks).
BUDGET = {"list": 64, "json": 160, "inline": 192}


def _spans(example: dict) -> list[str]:
    """Every run of up to MAX_SPAN_WORDS of the example's words that an answer may name. A span with ';'
    could not be read back from a list (the parser splits there) and one of punctuation alone scores nothing,
    so neither is offered."""
    words = example_tokens(example)
    spans = sorted({" ".join(words[i:j]) for i in range(len(words))
                    for j in range(i + 1, min(len(words), i + MAX_SPAN_WORDS) + 1)})
    return [s for s in spans if ";" not in s and clean_span(s)]


def candidate_entities(example: dict, types: list[str]) -> list[str]:
    """Every 'type: span' a list answer may name for this example."""
    return [f"{kind}: {span}" for kind in types for span in _spans(example)]


def candidate_json_items(example: dict, types: list[str]) -> list[str]:
    """Every '{"type": ..., "text": ...}' a JSON answer may hold for this example, written as render writes it."""
    return [json.dumps({"type": kind, "text": span}, ensure_ascii=False) for kind in types for span in _spans(example)]


def parse_entities(text: str, types: list[str], entity_format: str = "list") -> list[tuple[str, str]]:
    return parse(text, types, entity_format)


def format_entities(entities: list[dict], entity_format: str = "list", example: dict | None = None) -> str:
    return render({**(example or {}), "entities": entities}, entity_format)


def _scorer(entity_format: str):
    def score(generated: list[str], examples: list[dict], labels: list[str]) -> tuple[dict, list]:
        predicted = [parse(g, labels, entity_format) for g in generated]
        gold = [[(e["type"], e["text"]) for e in ex["entities"]] for ex in examples]
        metrics = span_scores(predicted, examples)
        metrics["text_f1"] = entity_scores(predicted, gold)["f1"]
        # the prediction column reads the same in every format: what was found, as a list
        shown = [SEPARATOR.join(f"{t}: {x}" for t, x in p) or NO_ENTITIES for p in predicted]
        return metrics, shown
    return score


def _task(entity_format: str) -> Task:
    lists = {"list": ListAnswer(candidate_entities, SEPARATOR, NO_ENTITIES),
             "json": ListAnswer(candidate_json_items, ", ", "[]", opening="[", closing="]")}
    return Task("ner", INSTRUCTIONS[entity_format], "{{ instruction }}\n\nText: {{ text }}", "{{ entities_text }}",
                COLUMNS, _scorer(entity_format), max_new_tokens=BUDGET[entity_format],
                structured=frozenset({"entities"}), derived=frozenset({"entities_text"}),
                derive=lambda ex: {"entities_text": render(ex, entity_format)},
                list_answer=lists.get(entity_format),
                copy_answer=CopyAnswer() if entity_format == "inline" else None)


TASKS = {entity_format: _task(entity_format) for entity_format in FORMATS}
TASK = TASKS["inline"]  # the default (template.entity_format), measured best on WNUT-17
