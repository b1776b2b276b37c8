"""Task metrics computed on generated text: entities, short answers, translation, math, open instructions.

Every function takes what the model generated (decoded strings) and the references, never token ids, so
the figures compare with published ones for the same task. Scales: BLEU and chrF are on sacrebleu's
0-100 scale (as papers report them); everything else is a share in 0-1, like `metrics.py`.
A denominator of 0 (no examples, no entities) gives 0.0 rather than an error, so an empty eval shows up as
a bad score instead of a crash halfway through a report.
"""
from __future__ import annotations

import re
import string
from collections import Counter

NO_ENTITIES = "none"
_STRIP = string.whitespace + string.punctuation


def _check_lengths(predictions: list, references: list) -> None:
    # zip would silently drop the tail of the longer list and report a score on fewer examples.
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")


def _ratio(num: float, den: float) -> float:
    return num / den if den else 0.0


# ---- named entities -------------------------------------------------------------------------------------
# Training targets are rendered by format_entities and generations are read back by parse_entities, so the
# model learns exactly the form the parser expects; the parser is still lenient about spacing and case.

def format_entities(entities: list[dict]) -> str:
    """Render entities in sentence order as 'type: text; type: text', or 'none' for no entities."""
    # Whitespace is collapsed so a newline inside a span cannot split it when parsed back.
    parts = [f"{e['type']}: {' '.join(e['text'].split())}" for e in entities]
    return "; ".join(parts) if parts else NO_ENTITIES


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
    _check_lengths(predicted, gold)
    n_pred = n_gold = correct = 0
    for pred, ref in zip(predicted, gold):
        p = Counter(_entity_key(*e) for e in pred)
        g = Counter(_entity_key(*e) for e in ref)
        # Multiset intersection: an entity named twice in the gold must be predicted twice to score twice.
        correct += sum((p & g).values())
        n_pred += sum(p.values())
        n_gold += sum(g.values())
    precision, recall = _ratio(correct, n_pred), _ratio(correct, n_gold)
    return {
        "precision": precision,
        "recall": recall,
        "f1": _ratio(2 * precision * recall, precision + recall),
        "predicted": n_pred,
        "gold": n_gold,
        "correct": correct,
    }


# ---- question answering (SQuAD v1.1) --------------------------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b")
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
    _check_lengths(predictions, references)
    em = f1 = 0.0
    for pred, refs in zip(predictions, references):
        if not refs:
            raise ValueError("every QA example needs at least one reference answer")
        em += max(float(_squad_norm(pred) == _squad_norm(r)) for r in refs)
        f1 += max(_token_f1(pred, r) for r in refs)
    n = len(predictions)
    return {"exact_match": _ratio(em, n), "token_f1": _ratio(f1, n)}


# ---- translation ----------------------------------------------------------------------------------------

def translation_scores(predictions: list[str], references: list[str]) -> dict:
    """Corpus-level BLEU (tokenizer 13a) and chrF from sacrebleu, on its 0-100 scale."""
    _check_lengths(predictions, references)
    if not predictions:
        return {"bleu": 0.0, "chrf": 0.0}
    import sacrebleu  # lazy: importing this module should not pull in the metric libraries

    # Corpus level, not a mean of sentence scores: that is what sacrebleu and published results report.
    return {
        "bleu": float(sacrebleu.corpus_bleu(predictions, [references]).score),
        "chrf": float(sacrebleu.corpus_chrf(predictions, [references]).score),
    }


# ---- math word problems ---------------------------------------------------------------------------------

# A minus sign only when it is not a hyphen ('120-page', '3-4'); commas only as groups of three, so '1,2'
# reads as two numbers; a decimal point only when digits follow, so a sentence's full stop is not taken.
_NUMBER = re.compile(r"(?:(?<![\w.])-)?\$?\d+(?:,\d{3}(?!\d))*(?:\.\d+)?")


def _norm_number(raw: str) -> str:
    text = raw.replace(",", "").replace("$", "")
    sign = "-" if text.startswith("-") else ""
    whole, _, frac = text.lstrip("-").partition(".")
    frac = frac.rstrip("0")  # 3.50 -> 3.5, 7.0 -> 7
    digits = str(int(whole)) + (f".{frac}" if frac else "")
    return "0" if digits == "0" else sign + digits  # no '-0'


def final_number(text: str) -> str | None:
    """The last number in the text, normalised ('1,000' -> '1000', '$3.50' -> '3.5', '7.0' -> '7'), or None."""
    numbers = _NUMBER.findall(text)
    return _norm_number(numbers[-1]) if numbers else None


def gsm8k_answer(solution: str) -> str:
    """The gold number of a GSM8K solution: the number after '####', else the last number in the text."""
    _, marker, tail = solution.rpartition("####")
    found = _NUMBER.search(tail) if marker else None
    if found:
        return _norm_number(found.group())
    # A reference given as a bare number, or a solution without '####', falls back to the last number.
    return final_number(solution) or ""


def math_scores(predictions: list[str], references: list[str]) -> dict:
    """exact_match: the last number generated equals the gold number; answered: share with any number."""
    _check_lengths(predictions, references)
    answers = [final_number(p) for p in predictions]
    gold = [gsm8k_answer(r) for r in references]
    # An empty gold ('' when a reference holds no number) can never match, because answers are None or digits.
    correct = sum(a is not None and a == g for a, g in zip(answers, gold))
    n = len(predictions)
    return {"exact_match": _ratio(correct, n), "answered": _ratio(sum(a is not None for a in answers), n)}


# ---- open instruction following -------------------------------------------------------------------------

def rouge_l(predictions: list[str], references: list[str]) -> dict:
    """Mean ROUGE-L F-measure (0-1) from Google's rouge-score, with the Porter stemmer."""
    _check_lengths(predictions, references)
    if not predictions:
        return {"rouge_l": 0.0}
    from rouge_score import rouge_scorer  # lazy, as for sacrebleu

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    # score(target, prediction): the reference comes first in rouge-score's API.
    total = sum(scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references))
    return {"rouge_l": total / len(predictions)}
