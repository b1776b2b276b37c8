"""Task presets: what a kind of task looks like from data to score.

A preset is a template (instruction, prompt layout, completion), the fields it reads, how the generated
text is turned back into an answer, and the metrics computed on that answer. Everything else (loading,
training, generation) is the same for every task, so adding a task means adding one entry here.

Metrics are computed on generated text, never on teacher-forced tokens: the same numbers for the
prompting baselines and for the fine-tuned model.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

Scorer = Callable[[list[str], list[dict], list[str]], tuple[dict, list]]  # (generated, examples, labels)


@dataclass(frozen=True)
class Task:
    name: str
    instruction: str
    prompt: str
    completion: str
    columns: tuple[str, ...]  # metric keys shown in the comparison table; the first is the headline
    score: Scorer
    max_new_tokens: int = 64  # the generation budget when eval.max_new_tokens is not set
    label_field: str | None = None  # a closed answer set (classification): stratified splits, constrained decoding
    optional: frozenset[str] = frozenset()  # fields that may be empty (Alpaca's input, QA's context)
    structured: frozenset[str] = frozenset()  # fields that hold lists (CoNLL entities), not text
    derived: frozenset[str] = frozenset()  # template fields computed by derive(), not read from the data
    derive: Callable[[dict], dict] = field(default=lambda ex: {})

    @property
    def headline(self) -> str:
        return self.columns[0]

    def answer_set(self, examples: list[dict]) -> list[str]:
        """What the template calls `labels`: the label set, or the entity types for extraction."""
        if self.label_field:
            return sorted({ex[self.label_field] for ex in examples})
        if "entities" in self.structured:
            return sorted({e["type"] for ex in examples for e in ex.get("entities", [])})
        return []


def _classification(generated, examples, labels):
    from tailorlm.eval.metrics import classification_metrics, normalise_label

    expected = [ex["label"] for ex in examples]
    predicted = [normalise_label(g, labels) for g in generated]
    return classification_metrics(expected, predicted, labels), predicted


def _ner(generated, examples, labels):
    from tailorlm.eval.task_metrics import entity_scores, parse_entities

    predicted = [parse_entities(g, labels) for g in generated]
    gold = [[(e["type"], e["text"]) for e in ex["entities"]] for ex in examples]
    return entity_scores(predicted, gold), ["; ".join(f"{t}: {x}" for t, x in p) or "none" for p in predicted]


def _qa(generated, examples, labels):
    from tailorlm.eval.task_metrics import qa_scores

    return qa_scores(generated, [[ex["answer"]] for ex in examples]), [g.strip() for g in generated]


def _translation(generated, examples, labels):
    from tailorlm.eval.task_metrics import translation_scores

    predicted = [g.strip() for g in generated]
    return translation_scores(predicted, [ex["target"] for ex in examples]), predicted


def _math(generated, examples, labels):
    from tailorlm.eval.task_metrics import final_number, gsm8k_answer, math_scores

    return math_scores(generated, [gsm8k_answer(ex["answer"]) for ex in examples]), [final_number(g) for g in generated]


def _instruction(generated, examples, labels):
    from tailorlm.eval.task_metrics import rouge_l

    predicted = [g.strip() for g in generated]
    return rouge_l(predicted, [ex["output"] for ex in examples]), predicted


def _entities_text(ex: dict) -> dict:
    from tailorlm.eval.task_metrics import format_entities

    return {"entities_text": format_entities(ex["entities"])}


TASKS: dict[str, Task] = {t.name: t for t in [
    Task("classification", "Classify the text. Answer with one of: {{ labels | join(', ') }}.",
         "{{ instruction }}\n\nText: {{ text }}", "{{ label }}", ("accuracy", "macro_f1", "valid"), _classification,
         label_field="label"),
    Task("ner", "List the named entities in the text as 'type: entity', separated by semicolons, or answer "
                "'none'. Types: {{ labels | join(', ') }}.",
         "{{ instruction }}\n\nText: {{ text }}", "{{ entities_text }}", ("f1", "precision", "recall"), _ner,
         max_new_tokens=64, structured=frozenset({"entities"}), derived=frozenset({"entities_text"}),
         derive=_entities_text),
    Task("qa", "Answer the question with a short answer.",
         "{{ instruction }}\n\n{% if context %}Context: {{ context }}\n\n{% endif %}Question: {{ question }}",
         "{{ answer }}", ("exact_match", "token_f1"), _qa, max_new_tokens=32, optional=frozenset({"context"})),
    Task("translation", "Translate the text.", "{{ instruction }}\n\n{{ source }}", "{{ target }}",
         ("bleu", "chrf"), _translation, max_new_tokens=128),
    Task("math", "Solve the problem step by step, then give the final answer after '####'.",
         "{{ instruction }}\n\n{{ question }}", "{{ answer }}", ("exact_match", "answered"), _math,
         max_new_tokens=320),
    Task("instruction", "{{ instruction }}", "{{ instruction }}{% if input %}\n\n{{ input }}{% endif %}",
         "{{ output }}", ("rouge_l",), _instruction, max_new_tokens=256, optional=frozenset({"input"})),
]}


def get_task(name: str) -> Task:
    return TASKS[name]
