"""Open instruction following (Alpaca style): the preset and its score, mean ROUGE-L (0-1).

There is no single right answer to parse, so the generated text is compared as a whole with the reference
output.
"""
from __future__ import annotations

from tailorlm.tasks.base import Task, check_lengths


def rouge_l(predictions: list[str], references: list[str]) -> dict:
    """Mean ROUGE-L F-measure (0-1) from Google's rouge-score, with the Porter stemmer."""
    check_lengths(predictions, references)
    if not predictions:
        return {"rouge_l": 0.0}
    from rouge_score import rouge_scorer  # lazy: importing this module should not pull in the metric libraries

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    # score(target, prediction): the reference comes first in rouge-score's API.
    total = sum(scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references))
    return {"rouge_l": total / len(predictions)}


def score(generated: list[str], examples: list[dict], labels: list[str]) -> tuple[dict, list]:
    predicted = [g.strip() for g in generated]
    return rouge_l(predicted, [ex["output"] for ex in examples]), predicted


TASK = Task("instruction", "{{ instruction }}", "{{ instruction }}{% if input %}\n\n{{ input }}{% endif %}",
            "{{ output }}", ("rouge_l",), score, max_new_tokens=256, optional=frozenset({"input"}))
