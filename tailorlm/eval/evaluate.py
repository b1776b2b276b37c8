"""Evaluate variants of one model on the same held-out split with the same decoding.

zero_shot and few_shot prompt the base model; fine_tuned is the trained model given the exact prompt it
was trained on. Few-shot demonstrations come from the training split only, so nothing leaks from test.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from tailorlm.config import EvalSpec
from tailorlm.data.templates import PromptTemplate
from tailorlm.data.tokenize import ChatFormat, Sample
from tailorlm.eval.generate import LabelTrie, generate


@dataclass
class VariantResult:
    metrics: dict
    predictions: list[dict]  # {input, expected, generated, predicted, variant}


def pick_demos(train: list[dict], k: int, seed: int, label_field: str | None = "label") -> list[dict]:
    """k training examples, cycling through labels so each label is shown before any repeats."""
    rng = random.Random(seed + 7)
    by_label: dict[str, list[dict]] = {}
    for ex in train:
        by_label.setdefault(ex[label_field] if label_field else "", []).append(ex)
    pools = [rng.sample(v, len(v)) for _, v in sorted(by_label.items())]
    rng.shuffle(pools)
    demos: list[dict] = []
    while len(demos) < k and any(pools):
        for pool in pools:
            if pool and len(demos) < k:
                demos.append(pool.pop())
    return demos


class Evaluator:
    def __init__(self, tokenizer, template: PromptTemplate, fmt: ChatFormat, labels: list[str], spec: EvalSpec,
                 device, label_field: str | None = "label"):
        self.tokenizer, self.template, self.fmt, self.labels = tokenizer, template, fmt, labels
        self.spec, self.device, self.label_field, self.task = spec, device, label_field, template.task
        self.max_new_tokens, self.trie = spec.max_new_tokens or self.task.max_new_tokens, None
        if label_field:
            answers = [fmt.encode_completion(fmt.completion_text("", template.completion({label_field: label})))
                       for label in labels]
            # Room for a short sentence around the label ("The topic is business."): a base model that answers in
            # a sentence must not be cut off before it names the label, or the baseline would be unfairly low.
            self.max_new_tokens = spec.max_new_tokens or max(len(a) for a in answers) + 16
            self.trie = LabelTrie(answers) if spec.decoding == "constrained" else None

    def prompts(self, samples: list[Sample], demos: list[dict] = ()) -> list[list[int]]:
        shots = [(self.template.prompt(d, self.labels), self.template.completion(d)) for d in demos]
        if not shots:
            return [s.prompt_ids for s in samples]  # exactly the training prompt
        return [self.fmt.encode_prompt(self.fmt.prompt_text(self.template.prompt(s.example, self.labels), shots))
                for s in samples]

    def run(self, model, samples: list[Sample], variant: str, demos: list[dict] = ()) -> VariantResult:
        generated = generate(model, self.tokenizer, self.prompts(samples, demos), self.max_new_tokens,
                             self.spec.batch_size, self.device, self.trie, description=f"eval {variant}")
        examples = [s.example for s in samples]
        metrics, predicted = self.task.score(generated, examples, self.labels)
        expected = [self.template.completion(ex) for ex in examples]
        predictions = [{"variant": variant, "input": _input_text(ex, self.template, self.labels), "expected": e,
                        "generated": g, "predicted": p, "where": ex.get("_where")}
                       for ex, e, g, p in zip(examples, expected, generated, predicted)]
        return VariantResult(metrics, predictions)


def _input_text(example: dict, template: PromptTemplate, labels: list[str]) -> str:
    """The example's own input (not the whole prompt) when there is an obvious one."""
    for name in ("text", "question", "source", "instruction"):
        if isinstance(example.get(name), str):
            return example[name]
    return template.prompt(example, labels)
