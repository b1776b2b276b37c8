"""Entities as answer text, and their score at the level published NER results use.

An extraction answer can be written three ways (template.entity_format):
    list    'person: John Smith; location: Paris', or 'none'
    inline  the sentence copied with each entity marked: '[John Smith | person] flew to [Paris | location]'
    json    '[{"type": "person", "text": "John Smith"}, {"type": "location", "text": "Paris"}]', or '[]'
Each is rendered from the gold entities for training and read back leniently from generations, so the model
learns exactly the form its parser expects and a near miss in layout still scores.

Scoring is strict entity-level precision, recall and F1, as conlleval and seqeval compute them: an entity is
right only when its type and its exact token span are. The model writes text, not tags, so each predicted
entity is placed on the sentence's tokens (its words, in order, case aside) to rebuild BIO tags, and seqeval
reads the chunks of both tag sequences. A predicted entity that cannot be placed (its words are not in the
sentence, or every run of them is taken by an entity placed before it: one token has one tag) counts as a
false positive, which scoring tags alone would silently drop.
"""
from __future__ import annotations

import json
import re
import string
from collections import Counter

from tailorlm.tasks.base import check_lengths, ratio

FORMATS = ("list", "inline", "json")
NO_ENTITIES = "none"
SEPARATOR = "; "
_STRIP = string.whitespace + string.punctuation
_INLINE = re.compile(r"\[([^\[\]|]+?)\s*\|\s*([^\[\]|]+?)\s*\]")
# A JSON object of one entity, either key first, read one by one so a cut-off or slightly broken list still
# gives the entities written before the damage.
_JSON_ITEM = re.compile(r'\{\s*"(type|text)"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(type|text)"\s*:\s*"((?:[^"\\]|\\.)*)"')


def clean_span(span: str) -> str:
    # Only trailing punctuation goes ('Paris.' at the end of a generation); leading characters can be part
    # of a name. The case is kept for display; scoring compares case-insensitively.
    return " ".join(span.split()).rstrip(_STRIP)


def example_tokens(example: dict) -> list[str]:
    """The sentence's tokens: CoNLL and token datasets keep them; other data is split on whitespace."""
    return list(example.get("tokens") or str(example.get("text", "")).split())


# --- placing entities on tokens -------------------------------------------------------------------------------

def _norm(word: str) -> str:
    stripped = word.rstrip(_STRIP)
    return (stripped or word).casefold()


def place(tokens: list[str], entities: list[tuple[str, str]]) -> tuple[list[tuple[str, int, int]], int]:
    """Each (type, span) on the first free run of tokens that spells it, searched after the previous entity
    first (answers list entities in sentence order), then from the start. Returns ([(type, first, last)], how
    many could not be placed)."""
    words = [_norm(t) for t in tokens]
    taken = [False] * len(tokens)
    placed, missing, after = [], 0, 0
    for kind, span in entities:
        target = [_norm(w) for w in span.split()]
        found = None
        for start in [*range(after, len(words)), *range(0, after)] if target else []:
            end = start + len(target)
            if words[start:end] == target and not any(taken[start:end]):
                found = start
                break
        if found is None:
            missing += 1
            continue
        last = found + len(target) - 1
        taken[found:last + 1] = [True] * len(target)
        placed.append((kind, found, last))
        after = last + 1
    return sorted(placed, key=lambda p: p[1]), missing


def bio_tags(n_tokens: int, placed: list[tuple[str, int, int]]) -> list[str]:
    tags = ["O"] * n_tokens
    for kind, first, last in placed:
        tags[first] = f"B-{kind}"
        for i in range(first + 1, last + 1):
            tags[i] = f"I-{kind}"
    return tags


def gold_tags(example: dict) -> list[str]:
    """The example's own BIO tags when its data had them (CoNLL, token datasets), else rebuilt from its entities."""
    if example.get("tags"):
        return list(example["tags"])
    tokens = example_tokens(example)
    placed, _ = place(tokens, [(e["type"], e["text"]) for e in example.get("entities", [])])
    return bio_tags(len(tokens), placed)


# --- the three answer formats ---------------------------------------------------------------------------------

def render(example: dict, entity_format: str) -> str:
    """The training answer for an example's gold entities in one format."""
    entities = example.get("entities", [])
    if entity_format == "json":
        return json.dumps([{"type": e["type"], "text": " ".join(e["text"].split())} for e in entities],
                          ensure_ascii=False)
    if entity_format == "inline":
        tokens = example_tokens(example)
        from seqeval.metrics.sequence_labeling import get_entities

        marks = {first: (kind, last) for kind, first, last in get_entities(gold_tags(example))}
        pieces, i = [], 0
        while i < len(tokens):
            if i in marks:
                kind, last = marks[i]
                pieces.append(f"[{' '.join(tokens[i:last + 1])} | {kind}]")
                i = last + 1
            else:
                pieces.append(tokens[i])
                i += 1
        return " ".join(pieces)
    # Whitespace is collapsed so a newline inside a span cannot split it when parsed back.
    return SEPARATOR.join(f"{e['type']}: {' '.join(e['text'].split())}" for e in entities) or NO_ENTITIES


def parse(text: str, types: list[str], entity_format: str) -> list[tuple[str, str]]:
    """(type, text) pairs read back from a generation in the given format; unknown types are dropped."""
    by_lower = {t.lower(): t for t in types}
    if entity_format == "inline":
        pairs = [(kind, span) for span, kind in _INLINE.findall(text)]
    elif entity_format == "json":
        pairs = _parse_json(text)
    else:
        pairs = []
        for piece in re.split(r"[;\n]", text):
            if ":" in piece:  # 'none' and stray prose have none; a piece without a type cannot be scored
                pairs.append(tuple(piece.split(":", 1)))
    found = []
    for kind, span in pairs:
        # Punctuation around the type goes, so list bullets ('- Person') still map to a type.
        kind, span = by_lower.get(str(kind).strip(_STRIP).lower()), clean_span(str(span))
        if kind is not None and span:
            found.append((kind, span))
    return found


def _parse_json(text: str) -> list[tuple[str, str]]:
    start, end = text.find("["), text.rfind("]")
    if 0 <= start < end:
        try:
            items = json.loads(text[start:end + 1])
            if isinstance(items, list):
                return [(i.get("type", ""), i.get("text", "")) for i in items if isinstance(i, dict)]
        except ValueError:
            pass
    pairs = []
    for k1, v1, k2, v2 in _JSON_ITEM.findall(text):
        if {k1, k2} == {"type", "text"}:
            try:
                values = {k1: json.loads(f'"{v1}"'), k2: json.loads(f'"{v2}"')}
            except ValueError:  # an escape JSON does not know ('\x'): this item is damaged, the others still count
                continue
            pairs.append((values["type"], values["text"]))
    return pairs


# --- scores ---------------------------------------------------------------------------------------------------

def span_scores(predicted: list[list[tuple[str, str]]], examples: list[dict]) -> dict:
    """Strict entity-level precision, recall and F1, micro-averaged and per type (seqeval's chunks of the gold
    tags against the tags rebuilt from each answer), with the unplaced predictions as false positives."""
    from seqeval.metrics.sequence_labeling import get_entities

    check_lengths(predicted, examples)
    correct, n_pred, n_gold = Counter(), Counter(), Counter()
    unplaced = 0
    for pred, example in zip(predicted, examples):
        tokens = example_tokens(example)
        placed, missing = place(tokens, pred)
        unplaced += missing
        n_pred.update(kind for kind, _ in pred)  # every predicted entity, placed or not
        gold = {tuple(chunk) for chunk in get_entities(gold_tags(example))}
        guess = {tuple(chunk) for chunk in get_entities(bio_tags(len(tokens), placed))}
        n_gold.update(kind for kind, _, _ in gold)
        correct.update(kind for kind, _, _ in gold & guess)
    per_type = {}
    for kind in sorted(set(n_gold) | set(n_pred)):
        p, r = ratio(correct[kind], n_pred[kind]), ratio(correct[kind], n_gold[kind])
        per_type[kind] = {"precision": p, "recall": r, "f1": ratio(2 * p * r, p + r), "support": n_gold[kind]}
    total_correct, total_pred, total_gold = sum(correct.values()), sum(n_pred.values()), sum(n_gold.values())
    precision, recall = ratio(total_correct, total_pred), ratio(total_correct, total_gold)
    return {"f1": ratio(2 * precision * recall, precision + recall), "precision": precision, "recall": recall,
            "predicted": total_pred, "gold": total_gold, "correct": total_correct, "unplaced": unplaced,
            "per_type": per_type}


def entity_scores(predicted: list[list[tuple[str, str]]], gold: list[list[tuple[str, str]]]) -> dict:
    """Micro precision/recall/F1 of exact (type, text) matches, counted as multisets per sentence: entities
    compared as text (case aside), wherever they stand in it. Kept beside span_scores (as text_f1), which it
    can exceed when a span's words occur twice in a sentence. Also returns the predicted/gold/correct counts;
    a zero denominator gives 0.0."""
    check_lengths(predicted, gold)
    n_pred = n_gold = right = 0
    for pred, ref in zip(predicted, gold):
        p = Counter(_text_key(*e) for e in pred)
        g = Counter(_text_key(*e) for e in ref)
        right += sum((p & g).values())  # an entity named twice in the gold must be predicted twice to score twice
        n_pred += sum(p.values())
        n_gold += sum(g.values())
    precision, recall = ratio(right, n_pred), ratio(right, n_gold)
    return {"precision": precision, "recall": recall, "f1": ratio(2 * precision * recall, precision + recall),
            "predicted": n_pred, "gold": n_gold, "correct": right}


def _text_key(kind: str, span: str) -> tuple[str, str]:
    # Gold pairs come straight from the data, not through parse, so both sides get the same cleaning here
    # ('U.S.' in gold must match 'U.S' parsed from a generation).
    return kind.lower(), clean_span(span).casefold()
