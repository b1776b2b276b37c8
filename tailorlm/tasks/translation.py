"""Translation: the preset and corpus-level BLEU and chrF from sacrebleu, on its 0-100 scale.

That scale (not 0-1 like the other tasks) is the one papers report, so the figures compare with published ones.
"""
from __future__ import annotations

from tailorlm.tasks.base import Task, check_lengths


def translation_scores(predictions: list[str], references: list[str]) -> dict:
    """Corpus-level BLEU (tokenizer 13a) and chrF from sacrebleu, on its 0-100 scale."""
    check_lengths(predictions, references)
    if not predictions:
        return {"bleu": 0.0, "chrf": 0.0}
    import sacrebleu  # lazy: importing this module should not pull in the metric libraries

    # Corpus level, not a mean of sentence scores: that is what sacrebleu and published results report.
    return {
        "bleu": float(sacrebleu.corpus_bleu(predictions, [references]).score),
        "chrf": float(sacrebleu.corpus_chrf(predictions, [references]).score),
    }


def score(generated: list[str], examples: list[dict], labels: list[str]) -> tuple[dict, list]:
    predicted = [g.strip() for g in generated]
    return translation_scores(predicted, [ex["target"] for ex in examples]), predicted


TASK = Task("translation", "Translate the text.", "{{ instruction }}\n\n{{ source }}", "{{ target }}",
            ("bleu", "chrf"), score, max_new_tokens=128)
