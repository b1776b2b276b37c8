"""Short-answer question answering: the preset and SQuAD v1.1 scoring (exact match, token F1, both 0-1).

Scored on the generated text against every reference answer, as the official SQuAD script does, so the
figures compare with published ones.
"""
from __future__ import annotations

import re
import string
from collections import Counter

from tailorlm.tasks.base import SpanAnswer, Task, check_lengths, ratio

_ARTICLES = re.compile(r"\b(a|an|the)\b")
# The share of rows whose context holds their answer above which a QA set counts as extractive (SQuAD: all of
# them, by construction); below it, answers are the model's own words and are generated freely.
EXTRACTIVE_SHARE = 0.9
_PUNCT_CHARS = set(string.punctuation)


def _squad_norm(text: str) -> str:
    # Same order as the official SQuAD v1.1 script: lowercase, drop punctuation, drop articles, fix spaces.
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT_CHARS)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _token_f1(prediction: str, reference: str) -> float:
    pred, ref = _squad_norm(prediction).split(), _squad_norm(reference).split()
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def qa_scores(predictions: list[str], references: list[list[str]]) -> dict:
    """SQuAD v1.1 exact_match and token_f1 (0-1): best over each example's references, averaged."""
    check_lengths(predictions, references)
    em = f1 = 0.0
    for pred, refs in zip(predictions, references):
        if not refs:
            raise ValueError("every QA example needs at least one reference answer")
        em += max(float(_squad_norm(pred) == _squad_norm(r)) for r in refs)
        f1 += max(_token_f1(pred, r) for r in refs)
    n = len(predictions)
    return {"exact_match": ratio(em, n), "token_f1": ratio(f1, n)}


def extractive_share(examples: list[dict]) -> float:
    """The share of rows whose answer is a run of words of their context (after SQuAD normalisation)."""
    held = [ex for ex in examples if ex.get("context")]
    inside = sum(f" {_squad_norm(ex['answer'])} " in f" {_squad_norm(ex['context'])} " for ex in held
                 if _squad_norm(ex.get("answer", "")))
    return ratio(inside, len(examples))


def is_extractive(examples: list[dict]) -> bool:
    return bool(examples) and extractive_share(examples) >= EXTRACTIVE_SHARE


def score(generated: list[str], examples: list[dict], labels: list[str]) -> tuple[dict, list]:
    return qa_scores(generated, [[ex["answer"]] for ex in examples]), [g.strip() for g in generated]


TASK = Task("qa", "Answer the question with a short answer.",
            "{{ instruction }}\n\n{% if context %}Context: {{ context }}\n\n{% endif %}Question: {{ question }}",
            "{{ answer }}", ("exact_match", "token_f1"), score, max_new_tokens=32, optional=frozenset({"context"}),
            span_answer=SpanAnswer("context"))
