"""Evaluate variants of one model on the same held-out split with the same decoding.

zero_shot and few_shot prompt the base model; fine_tuned is the trained model given the exact prompt it
was trained on. Few-shot demonstrations come from the training split only, so nothing leaks from test.
"""
from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass

import torch

from tailorlm.config import EvalSpec
from tailorlm.data.samples import Sample
from tailorlm.data.templates import PromptTemplate
from tailorlm.data.tokenize import ChatFormat
from tailorlm.eval.generate import LabelTrie, generate, generate_and_score, scores_together
from tailorlm.eval.copying import InlineCopy, SpanCopy
from tailorlm.eval.item_lists import item_list_trie
from tailorlm.eval.likelihood import answer_token_logprobs, constrained_answer
from tailorlm.tasks.classification import answer_complete
from tailorlm.tasks.entities import example_tokens


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
    """Scores one model on samples under one template: free generation, constrained decoding or (closed label
    sets) label log-likelihood, optionally after demonstrations, with what each prediction cost."""

    def __init__(self, tokenizer, template: PromptTemplate, fmt: ChatFormat, labels: list[str], spec: EvalSpec,
                 device, label_field: str | None = "label", spans: bool = False):
        """spans: the answers are spans of an input field (the task's span_answer; extractive QA), so
        constrained decoding applies."""
        self.tokenizer, self.template, self.fmt, self.labels = tokenizer, template, fmt, labels
        self.spans = spans and template.task.span_answer is not None
        self.spec, self.device, self.label_field, self.task = spec, device, label_field, template.task
        self.max_new_tokens, self.trie, self.answers = spec.max_new_tokens or self.task.max_new_tokens, None, []
        self.forms: list[tuple[int, list[int]]] = []  # (label index, token ids) of every surface form
        self._opening: str | None = None
        if label_field:
            encode = lambda text: fmt.encode_completion(fmt.completion_text("", template.completion(  # noqa: E731
                {label_field: text})))
            self.answers = [encode(label) for label in labels]  # exactly the completions training teaches
            # A base model asked for "negative or positive" often prefers "Negative": constrained decoding and
            # label likelihood that allowed only the exact spelling would score its second choice. Each label
            # also counts in its capitalised and lower-case forms (the answer parser ignores case anyway).
            self.forms = [(i, ids) for i, label in enumerate(labels)
                          for ids in _unique([self.answers[i]] + [encode(form) for form in _case_forms(label)])]
            # Room for a short sentence around the label ("The topic is business."): a base model that answers in
            # a sentence must not be cut off before it names the label, or the baseline would be unfairly low.
            self.max_new_tokens = spec.max_new_tokens or max(len(a) for a in self.answers) + 16
            self.trie = LabelTrie(self.form_ids)

    @property
    def form_ids(self) -> list[list[int]]:
        """The token ids of every surface form of every label, in the order of self.forms."""
        return [ids for _, ids in self.forms]

    @property
    def closed(self) -> bool:
        """A closed label set: constrained decoding and label likelihood apply."""
        return bool(self.label_field and self.labels)

    @property
    def kinds(self) -> list[str]:
        """How this task's answers can be scored. A list of items from a closed set (NER) can be constrained, but
        has no likelihood kind: its answers are every subset of the example's spans, too many to score each."""
        if self.closed:
            return ["free", "constrained", "likelihood"]
        listed = (self.task.list_answer or self.task.copy_answer) and self.labels
        return ["free", "constrained"] if listed or self.spans else ["free"]

    @property
    def decodes_constrained(self) -> bool:
        """Whether the trained model's answers are decoded constrained (eval.decoding, where the task allows)."""
        return self.spec.decoding in ("constrained", "auto") and "constrained" in self.kinds

    def item_trie(self, example: dict):
        """The constraint of one example's open answer: NER's spans under each type, as a list (an item-list
        trie) or its words copied with typed marks (inline); extractive QA's one span of its context."""
        if self._opening is None:  # the training completion's text before the answer (a space in the plain layout)
            marked = self.fmt.completion_text("", "\x00")
            self._opening = marked.split("\x00")[0] if "\x00" in marked else ""  # a template that drops it: none
        if self.spans:
            answer = self.task.span_answer
            return SpanCopy(self.tokenizer, str(example.get(answer.field) or "").split(), answer.max_words,
                            self._opening)
        if self.task.copy_answer:
            return InlineCopy(self.tokenizer, example_tokens(example), self.labels, self.task.copy_answer,
                              self._opening)
        answer = self.task.list_answer
        return item_list_trie(self.tokenizer, answer.items(example, self.labels), answer.separator, answer.empty,
                              self._opening, answer.opening, answer.closing)

    def prompts(self, samples: list[Sample], demos: list[dict] | list[list[dict]] = ()) -> tuple[list[list[int]], int]:
        """(prompt ids, demonstrations dropped). demos is one list for every row, or one list per row; a row
        whose prompt would pass eval.max_prompt_tokens loses demonstrations from the end until it fits."""
        if not demos:
            return [s.prompt_ids for s in samples], 0  # exactly the training prompt
        per_row = demos if isinstance(demos[0], list) else [demos] * len(samples)
        limit, prompts, dropped = self.spec.max_prompt_tokens, [], 0
        for sample, row_demos in zip(samples, per_row):
            shots = [(self.template.prompt(d, self.labels), self.template.completion(d)) for d in row_demos]
            question = self.template.prompt(sample.example, self.labels)
            ids = self.fmt.encode_prompt(self.fmt.prompt_text(question, shots))
            while shots and len(ids) + self.max_new_tokens > limit:
                shots.pop()
                dropped += 1
                ids = self.fmt.encode_prompt(self.fmt.prompt_text(question, shots))
            prompts.append(ids)
        return prompts, dropped

    def run(self, model, samples: list[Sample], variant: str, demos: list[dict] | list[list[dict]] = (),
            kind: str | None = None) -> VariantResult:
        """kind: free, constrained or likelihood (eval.decoding when None)."""
        kind = kind or ("constrained" if self.spec.decoding == "constrained" and self.decodes_constrained else "free")
        return self.run_kinds(model, samples, {kind: variant}, demos)[kind]

    def run_kinds(self, model, samples: list[Sample], variants: dict[str, str],
                  demos: list[dict] | list[list[dict]] = ()) -> dict[str, VariantResult]:
        """Several kinds on the same prompts (variants: kind -> variant name), each prompt run once.

        Constrained decoding and label likelihood of a closed label set, asked for together, are read off one
        scoring pass (marked shared_pass); constrained decoding alone is generated (a few steps on the greedy
        path cost less than scoring every label). Free generation asked for beside them starts from that same
        prompt pass. Each kind's seconds are what it would cost alone: the prompt pass, plus its own scoring
        or decoding."""
        for kind in variants:
            if kind not in self.kinds:
                raise ValueError(f"internal: {kind} scoring does not apply to the {self.task.name} task")
        prompts, dropped = self.prompts(samples, demos)
        examples = [s.example for s in samples]
        shared = self.closed and {"constrained", "likelihood"} <= set(variants)
        scored = ["constrained", "likelihood"] if shared else ["likelihood"] if "likelihood" in variants else []
        answered: dict[str, tuple[list[str], float]] = {}
        forms = self.form_ids
        if scored and "free" in variants and scores_together(model, prompts, forms, self.max_new_tokens,
                                                                self.spec.static_cache, self.spec.batch_size):
            timings: dict[str, float] = {}
            texts, token_logps = generate_and_score(
                model, self.tokenizer, prompts, forms, self.max_new_tokens, self.spec.batch_size, self.device,
                _describe(variants), self._free_done(), timings)
            answered["free"] = (texts, timings["prompt"] + timings["decode"])
            answered.update({k: (v, timings["prompt"] + timings["score"])
                             for k, v in self._read_scores(token_logps, scored).items()})
        elif scored:
            started = time.perf_counter()
            token_logps = answer_token_logprobs(model, prompts, forms, self.device, self.spec.batch_size,
                                                _describe({k: variants[k] for k in scored}))
            answered.update({k: (v, time.perf_counter() - started)
                             for k, v in self._read_scores(token_logps, scored).items()})
        for kind in variants:
            if kind not in answered:
                started = time.perf_counter()
                texts = self.decode(model, prompts, examples, kind, f"eval {variants[kind]}")
                answered[kind] = (texts, time.perf_counter() - started)
        k = max((len(d) for d in demos), default=0) if demos and isinstance(demos[0], list) else len(demos)
        results = {kind: self._result(examples, prompts, variant, kind, *answered[kind], k, dropped)
                   for kind, variant in variants.items()}
        if shared:
            for kind in scored:
                results[kind].metrics["shared_pass"] = True
        return results

    def _free_done(self):
        """When a free answer is complete: a closed-set answer that has named its label or ended its line."""
        return answer_complete(self.labels) if self.closed else None

    def decode(self, model, prompts: list[list[int]], examples: list[dict], kind: str, description: str = "generate",
               batch_size: int | None = None) -> list[str]:
        """The answer to each prompt under free or constrained decoding (what tailor predict writes too)."""
        done = self._free_done() if kind == "free" else None
        constraint = None
        if kind == "constrained":  # the label trie, or (a list answer: NER) each example's own item-list trie
            constraint = self.trie if self.closed else lambda i: self.item_trie(examples[i])
        return generate(model, self.tokenizer, prompts, self.max_new_tokens, batch_size or self.spec.batch_size,
                        self.device, constraint, description=description, done=done,
                        static=self.spec.static_cache)

    def _read_scores(self, token_logps: list[list[list[float]]], kinds: list[str]) -> dict[str, list[str]]:
        """The answers of one scoring pass over every surface form of every label: the most likely label
        (likelihood) and the answer constrained greedy decoding writes (constrained), for each prompt."""
        forms = self.form_ids
        texts: dict[str, list[str]] = {}
        if "likelihood" in kinds:
            texts["likelihood"] = [self.labels[max(range(len(self.labels)), key=by_label.__getitem__)]
                                   for by_label in (self.label_scores([sum(t) for t in row]) for row in token_logps)]
        if "constrained" in kinds:
            texts["constrained"] = [self.tokenizer.decode(constrained_answer(forms, row, self.max_new_tokens),
                                                          skip_special_tokens=True).strip() for row in token_logps]
        return texts

    def _result(self, examples: list[dict], prompts: list[list[int]], variant: str, kind: str, generated: list[str],
                seconds: float, k: int, dropped: int) -> VariantResult:
        metrics, predicted = self.task.score(generated, examples, self.labels)
        metrics.update({"kind": kind, "k": k, "prompt_tokens": round(sum(map(len, prompts)) / max(len(prompts), 1), 1),
                        "seconds_per_100": round(seconds / max(len(prompts), 1) * 100, 2), "dropped_demos": dropped})
        expected = [self.template.completion(ex) for ex in examples]
        predictions = [{"variant": variant, "input": _input_text(ex, self.template, self.labels), "expected": e,
                        "generated": g, "predicted": p, "where": ex.get("_where")}
                       for ex, e, g, p in zip(examples, expected, generated, predicted)]
        return VariantResult(metrics, predictions)

    def label_scores(self, form_scores: list[float]) -> list[float]:
        """Each label's log-probability: its surface forms' probabilities summed (log-sum-exp)."""
        grouped: list[list[float]] = [[] for _ in self.labels]
        for (label, _), score in zip(self.forms, form_scores):
            grouped[label].append(score)
        return [torch.logsumexp(torch.tensor(g, dtype=torch.float64), 0).item() for g in grouped]


def _case_forms(label: str) -> list[str]:
    return [label[:1].upper() + label[1:], label.lower()]


def _unique(sequences: list[list[int]]) -> list[list[int]]:
    seen, kept = set(), []
    for seq in sequences:
        if tuple(seq) not in seen:
            seen.add(tuple(seq))
            kept.append(seq)
    return kept


def _input_text(example: dict, template: PromptTemplate, labels: list[str]) -> str:
    """The example's own input (not the whole prompt) when there is an obvious one."""
    for name in ("text", "question", "source", "instruction"):
        if isinstance(example.get(name), str):
            return example[name]
    return template.prompt(example, labels)


def _describe(variants: dict[str, str]) -> str:
    """A progress bar's name for kinds run together: 'eval few_shot (free, constrained, likelihood)', short
    enough for an 80-column terminal or log, rather than every variant's full name."""
    if len(variants) == 1:
        return f"eval {next(iter(variants.values()))}"
    base = os.path.commonprefix(list(variants.values())).rstrip("_")
    return f"eval {base} ({', '.join(variants)})" if base else "eval " + " + ".join(variants.values())
