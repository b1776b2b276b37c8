"""A classic baseline for extractive QA: the sliding-window lexical match (Richardson et al., 2013, MCTest),
adapted to spans. It needs no training beyond the answers' usual length, answers in milliseconds, and gives
"fine-tuning beats X" an X for QA, as TF-IDF + logistic regression does for classification.

Each span of the context of the training answers' median length is scored by the question words found in the
words around it, each weighted by its rarity in that context (a word the context repeats says little about
where the answer is) and by its nearness (the distance-weighted variant, which breaks the ties a flat window
leaves between neighbouring spans); spans made of question words, or that begin or end with a function word or a mark,
are passed over, since an answer rarely repeats its question or starts with "of". The best-scoring span is the
answer; ties go to the earliest.
"""
from __future__ import annotations

import math
import re
import statistics
import time
from collections import Counter
from dataclasses import dataclass

WINDOW = 8  # context words on each side of a span that count as its surroundings
_WORD = re.compile(r"\w+")
# English function words that do not begin or end an answer span
_FUNCTION = frozenset("a an the of in on at to for from by with and or but as is are was were be been has have "
                      "had do does did it its this that these those which who whom what when where why how".split())


def _norm(word: str) -> str:
    return "".join(_WORD.findall(word.casefold()))


@dataclass
class WindowResult:
    predicted: list[str]
    seconds_per_100: float
    span_words: int  # the span length used: the training answers' median, in words


def answer_length(answers: list[str]) -> int:
    lengths = [len(a.split()) for a in answers if a.split()]
    return max(1, min(10, round(statistics.median(lengths)))) if lengths else 1


def best_span(question: str, context: str, length: int) -> str:
    """The context span of `length` words (fewer when the context is shorter) whose surroundings best match the
    question; '' for an empty context."""
    words = context.split()
    if not words:
        return ""
    normed = [_norm(w) for w in words]
    counts = Counter(normed)
    asked = {_norm(w) for w in question.split()} - {""}
    weight = {w: math.log(1.0 + 1.0 / counts[w]) for w in asked if counts[w]}
    length = min(length, len(words))
    best, best_score = 0, -math.inf
    for start in range(len(words) - length + 1):
        span = set(normed[start:start + length])
        edges = (normed[start], normed[start + length - 1])
        if span <= asked or any(e in _FUNCTION or not e for e in edges):
            continue
        nearest: dict[str, int] = {}  # each question word's distance from the span, the nearest occurrence
        for distance in range(1, WINDOW + 1):
            for i in (start - distance, start + length - 1 + distance):
                if 0 <= i < len(words) and normed[i] in weight:
                    nearest.setdefault(normed[i], distance)
        score = sum(weight[w] / d for w, d in nearest.items()) - sum(weight.get(w, 0.0) for w in span)
        if score > best_score:
            best, best_score = start, score
    return " ".join(words[best:best + length]) if best_score > -math.inf else words[0]


def sliding_window(train_answers: list[str], questions: list[str], contexts: list[str]) -> WindowResult:
    started = time.perf_counter()
    length = answer_length(train_answers)
    predicted = [best_span(q, c, length) for q, c in zip(questions, contexts)]
    per_100 = (time.perf_counter() - started) / max(len(questions), 1) * 100
    return WindowResult(predicted, per_100, length)
