"""Metrics computed on generated text, never on teacher-forced tokens.

Classification: the generated answer is normalised to a label (case, punctuation, a trailing explanation);
an answer that names no label, or several, is invalid and counts as wrong.
"""
from __future__ import annotations

import re
import string

from sklearn.metrics import f1_score

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def _norm(text: str) -> str:
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def normalise_label(generated: str, labels: list[str]) -> str | None:
    """Map generated text to one label, or None when it names none (or several) of them."""
    text = _norm(generated)
    if not text:
        return None
    by_norm = {_norm(label): label for label in labels if _norm(label)}
    if text in by_norm:
        return by_norm[text]
    # 'Business: the article is about ...' names exactly one label: that is the answer. A label inside a
    # longer mentioned label ('positive' in 'very positive') does not count as a second one.
    mentioned = [n for n in by_norm if re.search(rf"\b{re.escape(n)}\b", text)]
    mentioned = [n for n in mentioned if not any(n != o and re.search(rf"\b{re.escape(n)}\b", o) for o in mentioned)]
    return by_norm[mentioned[0]] if len(mentioned) == 1 else None


def classification_metrics(expected: list[str], predicted: list[str | None], labels: list[str]) -> dict:
    """accuracy, macro-F1 over the label set, share of valid answers, and a confusion table gold -> predicted."""
    n = len(expected)
    invalid = "(invalid)"
    pred = [p if p is not None else invalid for p in predicted]
    correct = sum(e == p for e, p in zip(expected, pred))
    present = [label for label in labels if label in set(expected) | set(pred)]
    confusion = {gold: {} for gold in labels}
    for e, p in zip(expected, pred):
        row = confusion.setdefault(e, {})
        row[p] = row.get(p, 0) + 1
    return {
        "n": n,
        "accuracy": correct / n if n else 0.0,
        "macro_f1": float(f1_score(expected, pred, labels=present, average="macro", zero_division=0)) if n else 0.0,
        "valid": sum(p is not None for p in predicted) / n if n else 0.0,
        "confusion": confusion,
    }
