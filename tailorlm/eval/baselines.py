"""Prompting at its best, before fine-tuning claims a gain.

For a task with a closed label set, the base model is prompted zero-shot and few-shot, and each is scored
three ways: free generation, decoding constrained to the labels, and label log-likelihood. The fine-tuned
model is compared with the best of all of them. Free generation alone would count a base model that does not
follow the answer format as ignorant, and the gain over it would be partly a gain in format-following.

Around them: the k-shot curve (prompting quality against the number of demonstrations, where it stops
improving), demonstrations drawn at random or retrieved by similarity, and a TF-IDF + logistic regression
classifier trained on the same split, with what each prediction costs in prompt tokens and seconds.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

from tailorlm.config import EvalSpec
from tailorlm.data.formats import bio_entities
from tailorlm.eval.classic import majority_class, nearest, tfidf_logistic_regression
from tailorlm.eval.crf import crf_tagger
from tailorlm.eval.evaluate import Evaluator, pick_demos
from tailorlm.eval.sliding_window import sliding_window
from tailorlm.tasks.entities import example_tokens, gold_tags

PROMPTING = ("zero_shot", "few_shot")
CLASSIC = "classic"
MAJORITY = "majority"  # the most frequent training label, every time (closed label sets)
CURVE_KIND_ORDER = ("likelihood", "constrained", "free")  # the cheapest kind measures the curve's inner points


def variant_name(base: str, kind: str) -> str:
    """zero_shot (free generation), zero_shot_constrained, zero_shot_likelihood, fine_tuned, ..."""
    return base if kind == "free" else f"{base}_{kind}"


def is_prompting(variant: str) -> bool:
    return variant.startswith(PROMPTING)


def best_prompting(variants: dict[str, dict], headline: str) -> dict | None:
    """{variant, value} of the best prompting result of any kind; the fine-tuned gain is measured against it."""
    scored = [(m[headline], v) for v, m in variants.items() if is_prompting(v) and m.get(headline) is not None]
    if not scored:
        return None
    order = list(variants)
    value, variant = max(scored, key=lambda x: (x[0], -order.index(x[1])))  # ties: the first listed
    return {"variant": variant, "value": value}


@dataclass
class Baselines:
    variants: dict[str, dict] = field(default_factory=dict)
    predictions: list[dict] = field(default_factory=list)
    curve: dict = field(default_factory=dict)  # {kind, metric, points: [{k, value, rows, dropped_demos}], best_k}


def run_baselines(model, evaluator: Evaluator, train: list[dict], test: list, spec: EvalSpec, seed: int,
                  report=print, classic_with: tuple[Evaluator, list] | None = None) -> Baselines:
    """Every prompting baseline of one task on its test samples, the k-shot curve, and the classic classifier.
    classic_with: the evaluator and test samples of the training format, in which the classic model's answers
    are written and scored, where the prompting asks in another (extraction: a base model is asked for lists,
    the fine-tuned model copies inline)."""
    out = Baselines()
    kinds = [k for k in evaluator.kinds if k in spec.prompting] or ["free"]
    # A conversation is its own context: demonstrations would be other whole conversations, so chat is compared
    # with zero-shot prompting alone.
    ks = [0] if evaluator.task.conversational else spec.few_shot_k
    largest = max(ks)
    demos_for = _demo_picker(evaluator, train, test, spec.demos, seed)
    headline = evaluator.task.headline
    measured: dict[tuple[int, str], dict] = {}
    for base, k in (("zero_shot", 0), ("few_shot", largest)):
        if base not in spec.baselines or (base == "few_shot" and largest == 0):
            continue
        results = evaluator.run_kinds(model, test, {kind: variant_name(base, kind) for kind in kinds}, demos_for(k))
        for kind, result in results.items():
            name = variant_name(base, kind)
            out.variants[name] = result.metrics
            out.predictions += result.predictions
            measured[(k, kind)] = {"rows": len(test), **result.metrics}
            report(name, result.metrics)
    curve_kind = next((k for k in CURVE_KIND_ORDER if k in kinds), "free")
    rows = _curve_rows(test, spec.curve_rows, seed)
    points = []
    for k in ks:
        if (k, curve_kind) not in measured:
            if k not in (0, largest) and not evaluator.closed:
                continue  # open answers: the inner points would cost a full generation each
            if (k == 0 and "zero_shot" not in spec.baselines) or (k == largest and "few_shot" not in spec.baselines):
                continue
            result = evaluator.run(model, rows, f"{k}-shot ({curve_kind})", demos_for(k, rows), curve_kind)
            measured[(k, curve_kind)] = {"rows": len(rows), **result.metrics}
        m = measured[(k, curve_kind)]
        points.append({"k": k, "value": m[headline], "rows": m["rows"], "dropped_demos": m["dropped_demos"],
                       "prompt_tokens": m["prompt_tokens"]})
    if len(points) > 1:  # a curve of one point (zero-shot alone, as for chat) says nothing the table does not
        best = max(points, key=lambda p: (p["value"], -p["k"]))  # the smallest k that reaches the best value
        out.curve = {"kind": curve_kind, "metric": headline, "demos": spec.demos, "points": points, "best_k": best["k"]}
    # the classic model of each kind of task: a linear classifier, a CRF tagger, a lexical span matcher
    classic = _classic if evaluator.closed and evaluator.label_field else \
        _crf if "entities" in evaluator.task.structured and evaluator.labels else \
        _window if evaluator.spans else None
    if spec.classic and classic is _classic:  # the floor any classifier must clear: answering the prior
        out.variants[MAJORITY] = _majority(evaluator, train, test)
        report(MAJORITY, out.variants[MAJORITY])
    if spec.classic and classic:
        # the classic model reads the examples alone; its answers are written as the training format writes them
        classic_evaluator, classic_test = classic_with or (evaluator, test)
        out.variants[CLASSIC], predictions = classic(classic_evaluator, train, classic_test, seed)
        out.predictions += predictions
        report(CLASSIC, out.variants[CLASSIC])
    return out


def _demo_picker(evaluator: Evaluator, train: list[dict], test: list, how: str, seed: int):
    """demos_for(k, samples=test): the demonstrations of k shots, one list for all rows (random) or one per row
    (similar). The same training examples for every kind, so the kinds differ in scoring alone."""
    if how == "random":
        return lambda k, samples=None: pick_demos(train, k, seed, evaluator.label_field) if k else []
    texts = [input_text(ex, evaluator) for ex in train]
    cache: dict[int, list[list[int]]] = {}

    def similar(k: int, samples=None):
        if not k:
            return []
        samples = test if samples is None else samples
        key = (k, id(samples))
        if key not in cache:
            cache[key] = nearest(texts, [input_text(s.example, evaluator) for s in samples], k)
        # most similar last: nearest the question, where a model weighs demonstrations most
        return [[train[i] for i in reversed(row)] for row in cache[key]]

    return similar


def input_text(example: dict, evaluator: Evaluator) -> str:
    """The example's own input fields, joined: what retrieval and the classic classifier see."""
    fields = sorted(evaluator.template.input_fields)
    return "\n".join(str(example.get(f, "")) for f in fields if isinstance(example.get(f), (str, int, float)))


def _curve_rows(test: list, limit: int | None, seed: int) -> list:
    if limit is None or len(test) <= limit:
        return test
    keep = sorted(random.Random(seed + 11).sample(range(len(test)), limit))
    return [test[i] for i in keep]


def _classic(evaluator: Evaluator, train: list[dict], test: list, seed: int) -> tuple[dict, list[dict]]:
    field_ = evaluator.label_field
    result = tfidf_logistic_regression([input_text(ex, evaluator) for ex in train], [ex[field_] for ex in train],
                                       [input_text(s.example, evaluator) for s in test], seed)
    examples = [s.example for s in test]
    metrics, predicted = evaluator.task.score(result.predicted, examples, evaluator.labels)
    metrics.update({"kind": "tf-idf + logistic regression", "k": 0, "prompt_tokens": 0.0,
                    "seconds_per_100": round(result.seconds_per_100, 4), "dropped_demos": 0,
                    "train_seconds": round(result.train_seconds, 2)})
    predictions = [{"variant": CLASSIC, "input": input_text(ex, evaluator), "expected": ex[field_], "generated": g,
                    "predicted": p, "where": ex.get("_where")} for ex, g, p in zip(examples, result.predicted, predicted)]
    return metrics, predictions


def _majority(evaluator: Evaluator, train: list[dict], test: list) -> dict:
    """The majority-class row: accuracy and macro-F1 of always answering the most frequent training label."""
    result = majority_class([ex[evaluator.label_field] for ex in train], len(test))
    metrics, _ = evaluator.task.score(result.predicted, [s.example for s in test], evaluator.labels)
    metrics.pop("confusion", None)  # one column of counts: the test split's label counts, which the data report has
    metrics.update({"kind": "majority class", "label": result.predicted[0] if result.predicted else None, "k": 0,
                    "prompt_tokens": 0.0, "seconds_per_100": 0.0, "dropped_demos": 0})
    return metrics


def _crf(evaluator: Evaluator, train: list[dict], test: list, seed: int) -> tuple[dict, list[dict]]:
    """Extraction's classic baseline: a CRF tagger; its tags are written as the run's answers and scored by
    the task's own scorer, so its figures mean what every other row's do."""
    examples = [s.example for s in test]
    tokens = [example_tokens(ex) for ex in examples]
    result = crf_tagger([example_tokens(ex) for ex in train], [gold_tags(ex) for ex in train], tokens)
    answers = [evaluator.task.derive({"tokens": t, "tags": tags, "text": " ".join(t),
                                      "entities": bio_entities(t, tags)})["entities_text"]
               for t, tags in zip(tokens, result.predicted)]
    metrics, predicted = evaluator.task.score(answers, examples, evaluator.labels)
    metrics.update({"kind": "crf", "k": 0, "prompt_tokens": 0.0, "seconds_per_100": round(result.seconds_per_100, 4),
                    "dropped_demos": 0, "train_seconds": round(result.train_seconds, 2)})
    return metrics, _classic_rows(evaluator, examples, answers, predicted)


def _window(evaluator: Evaluator, train: list[dict], test: list, seed: int) -> tuple[dict, list[dict]]:
    """Extractive QA's classic baseline: the span whose surroundings best match the question."""
    examples = [s.example for s in test]
    field_ = evaluator.task.span_answer.field
    result = sliding_window([str(ex.get("answer", "")) for ex in train],
                            [str(ex.get("question", "")) for ex in examples], [str(ex.get(field_) or "") for ex in examples])
    metrics, predicted = evaluator.task.score(result.predicted, examples, evaluator.labels)
    metrics.update({"kind": "sliding window", "k": 0, "prompt_tokens": 0.0,
                    "seconds_per_100": round(result.seconds_per_100, 4), "dropped_demos": 0,
                    "span_words": result.span_words})
    return metrics, _classic_rows(evaluator, examples, result.predicted, predicted)


def _classic_rows(evaluator: Evaluator, examples: list[dict], generated: list[str], predicted: list) -> list[dict]:
    """predictions.jsonl rows of a classic model's open answers, laid out as the evaluator lays out a model's:
    the example's input fields, and the training completion as what was expected."""
    return [{"variant": CLASSIC, "input": input_text(ex, evaluator), "expected": evaluator.template.completion(ex),
             "generated": g, "predicted": p, "where": ex.get("_where")}
            for ex, g, p in zip(examples, generated, predicted)]
