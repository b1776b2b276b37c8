"""Named-entity extraction: the preset, how entities are written as text and read back, and their score.

Training targets are rendered by format_entities and generations are read back by parse_entities, so the
model learns exactly the form the parser expects; the parser is still lenient about spacing and case.
Scores are shares in 0-1, computed on the generated text, never on token ids.
"""
from __future__ import annotations

import re
import string
from collections import Counter

from tailorlm.tasks.base import ListAnswer, Task, check_lengths, ratio

NO_ENTITIES = "none"
SEPARATOR = "; "
_STRIP = string.whitespace + string.punctuation
# Spans longer than this are not offered to constrained decoding: 99.6% of WNUT-17's training entities have at
# most 8 words (the rest are titles), and each extra word adds a span per word of a long sentence.
MAX_SPAN_WORDS = 8


def format_entities(entities: list[dict]) -> str:
    """Render entities in sentence order as 'type: text; type: text', or 'none' for no entities."""
    # Whitespace is collapsed so a newline inside a span cannot split it when parsed back.
    parts = [f"{e['type']}: {' '.join(e['text'].split())}" for e in entities]
    return SEPARATOR.join(parts) if parts else NO_ENTITIES


def candidate_entities(example: dict, types: list[str]) -> list[str]:
    """Every 'type: span' an answer may name for this example: each type with each run of up to MAX_SPAN_WORDS
    of its words. A span with ';' could not be read back (the parser splits there) and one of punctuation
    alone scores nothing, so neither is offered."""
    words = example["text"].split()
    spans = sorted({" ".join(words[i:j]) for i in range(len(words))
                    for j in range(i + 1, min(len(words), i + MAX_SPAN_WORDS) + 1)})
    spans = [s for s in spans if ";" not in s and _clean_span(s)]
    return [f"{kind}: {span}" for kind in types for span in spans]


def parse_entities(text: str, types: list[str]) -> list[tuple[str, str]]:
    """Read (type, text) pairs back from generated text; pieces with an unknown type or no ':' are dropped."""
    by_lower = {t.lower(): t for t in types}
    found = []
    for piece in re.split(r"[;\n]", text):
        if ":" not in piece:
            continue  # covers 'none' and stray prose; a piece without a type cannot be scored
        kind, span = piece.split(":", 1)
        # Strip punctuation on both sides of the type so list bullets ('- Person') still map to a type.
        kind = by_lower.get(kind.strip(_STRIP).lower())
        span = _clean_span(span)
        if kind is not None and span:
            found.append((kind, span))
    return found


def _clean_span(span: str) -> str:
    # Only trailing punctuation goes ('Paris.' at the end of a generation); leading characters can be part
    # of a name. The case is kept for display; scoring compares case-insensitively.
    return " ".join(span.split()).rstrip(_STRIP)


def _entity_key(kind: str, span: str) -> tuple[str, str]:
    # Gold pairs may come straight from the data rather than through parse_entities, so both sides get the
    # same cleaning here ('U.S.' in gold must match 'U.S' parsed from a generation).
    return kind.lower(), _clean_span(span).casefold()


def entity_scores(predicted: list[list[tuple[str, str]]], gold: list[list[tuple[str, str]]]) -> dict:
    """Micro precision/recall/F1 of exact (type, text) matches, counted as multisets per example.

    Like conlleval's entity-level score, a partly right span or a wrong type counts as both a false positive
    and a false negative; spans are compared as text (case-insensitive) because the model writes text, not
    tags. Returns precision, recall, f1 and the predicted/gold/correct counts; a zero denominator gives 0.0.
    """
    check_lengths(predicted, gold)
    n_pred = n_gold = correct = 0
    for pred, ref in zip(predicted, gold):
        p = Counter(_entity_key(*e) for e in pred)
        g = Counter(_entity_key(*e) for e in ref)
        # Multiset intersection: an entity named twice in the gold must be predicted twice to score twice.
        correct += sum((p & g).values())
        n_pred += sum(p.values())
        n_gold += sum(g.values())
    precision, recall = ratio(correct, n_pred), ratio(correct, n_gold)
    return {
        "precision": precision,
        "recall": recall,
        "f1": ratio(2 * precision * recall, precision + recall),
        "predicted": n_pred,
        "gold": n_gold,
        "correct": correct,
    }


def score(generated: list[str], examples: list[dict], labels: list[str]) -> tuple[dict, list]:
    predicted = [parse_entities(g, labels) for g in generated]
    gold = [[(e["type"], e["text"]) for e in ex["entities"]] for ex in examples]
    return entity_scores(predicted, gold), ["; ".join(f"{t}: {x}" for t, x in p) or NO_ENTITIES for p in predicted]


def _entities_text(ex: dict) -> dict:
    return {"entities_text": format_entities(ex["entities"])}


TASK = Task("ner", "List the named entities in the text as 'type: entity', separated by semicolons, or answer "
                   "'none'. Types: {{ labels | join(', ') }}.",
            "{{ instruction }}\n\nText: {{ text }}", "{{ entities_text }}", ("f1", "precision", "recall"), score,
            max_new_tokens=64, structured=frozenset({"entities"}), derived=frozenset({"entities_text"}),
            derive=_entities_text, list_answer=ListAnswer(candidate_entities, SEPARATOR, NO_ENTITIES))
