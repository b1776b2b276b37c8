"""Math word problems (GSM8K style): the preset, the final number read out of a solution, and its score.

The model writes its reasoning and then the answer; only the last number it generates is compared with the
gold number, both normalised ('1,000' and '1000.0' are the same answer). Not named math.py, so that it can
never be mistaken for the standard library's math module.
"""
from __future__ import annotations

import re

from tailorlm.tasks.base import Task, check_lengths, ratio

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
    check_lengths(predictions, references)
    answers = [final_number(p) for p in predictions]
    gold = [gsm8k_answer(r) for r in references]
    # An empty gold ('' when a reference holds no number) can never match, because answers are None or digits.
    correct = sum(a is not None and a == g for a, g in zip(answers, gold))
    n = len(predictions)
    return {"exact_match": ratio(correct, n), "answered": ratio(sum(a is not None for a in answers), n)}


def score(generated: list[str], examples: list[dict], labels: list[str]) -> tuple[dict, list]:
    return math_scores(generated, [gsm8k_answer(ex["answer"]) for ex in examples]), [final_number(g) for g in generated]


TASK = Task("math", "Solve the problem step by step, then give the final answer after '####'.",
            "{{ instruction }}\n\n{{ question }}", "{{ answer }}", ("exact_match", "answered"), score,
            max_new_tokens=320)
