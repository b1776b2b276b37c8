"""Classification: the preset, how a generated answer is read back as a label, and its metrics.

The generated answer is normalised to a label (case, punctuation, a trailing explanation); an answer that
names no label is invalid and counts as wrong. Metrics are computed on generated text, never on
teacher-forced tokens, so prompting baselines and the fine-tuned model get the same numbers. The answer
parsing lives here, beside the preset, because evaluation (eval/evaluate.py stops generation with
answer_complete) and scoring must read an answer the same way.
"""
from __future__ import annotations

import re
import string

from tailorlm.tasks.base import Task

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def _norm(text: str) -> str:
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def normalise_label(generated: str, labels: list[str]) -> str | None:
    """Map generated text to the label it names (the first, if several), or None when it names none."""
    text = _norm(generated)
    if not text:
        return None
    by_norm = {_norm(label): label for label in labels if _norm(label)}
    if text in by_norm:
        return by_norm[text]
    # A sentence around the answer ("The topic of this article is Business.") counts as that answer: the
    # label named first wins, as in common evaluation harnesses, which is generous to prompting baselines.
    # At one position the longer label wins ('very positive' over 'positive').
    found = [(m.start(), -len(norm), label) for norm, label in by_norm.items()
             for m in [re.search(rf"\b{re.escape(norm)}\b", text)] if m]
    return min(found)[2] if found else None


def classification_metrics(expected: list[str], predicted: list[str | None], labels: list[str]) -> dict:
    """accuracy, macro-F1 over the label set, share of valid answers, and a confusion table gold -> predicted."""
    # Lazy: scikit-learn takes about a second to import, and everything that reads a task preset (data checks,
    # templates, the CLI) would pay for it; only scoring needs it.
    from sklearn.metrics import f1_score

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


def answer_complete(labels: list[str]):
    """done(text) for free generation of a label: the answer has ended its line, or has named a label that
    a space or punctuation already follows (so the next token cannot turn 'tech' into 'technology').
    Text generated later cannot name a label that starts earlier, so the prediction stays the same (barring a
    longer label that begins with this one); it saves the tokens of the sentence around the label."""
    patterns = [re.compile(r"\b" + r"\s+".join(map(re.escape, _norm(label).split())) + r"\b(?=\s)")
                for label in labels if _norm(label)]

    def done(text: str) -> bool:
        if "\n" in text.strip():
            return True
        spaced = _PUNCT.sub(" ", text.lower())
        return any(p.search(spaced) for p in patterns)

    return done


def score(generated: list[str], examples: list[dict], labels: list[str]) -> tuple[dict, list]:
    expected = [ex["label"] for ex in examples]
    predicted = [normalise_label(g, labels) for g in generated]
    return classification_metrics(expected, predicted, labels), predicted


TASK = Task("classification", "Classify the text. Answer with one of: {{ labels | join(', ') }}.",
            "{{ instruction }}\n\nText: {{ text }}", "{{ label }}", ("accuracy", "macro_f1", "valid"), score,
            label_field="label")
