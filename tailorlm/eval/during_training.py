"""What runs at each evaluation during training: the validation loss, the task metric on generated validation
text, and retention (perplexity of general data, with its guardrail).

It lives in eval/ and is handed to the training phase as an object with three calls (before, evaluate,
after), so the loop (train/) knows nothing of generation, tasks or retention data: layers point one way.
"""
from __future__ import annotations

import random

from tailorlm.config import RunConfig, TemplateSpec
from tailorlm.data.samples import Sample
from tailorlm.data.templates import PromptTemplate
from tailorlm.errors import ConfigError
from tailorlm.eval.evaluate import Evaluator
from tailorlm.eval.retention import RetentionProbe
from tailorlm.train import distributed
from tailorlm.train.step import StepContext, validation_loss
from tailorlm.ui import console


def metric_key(task: str, metric: str) -> str:
    """A task metric's name in logs, train_log.json and eval.select.metric: 'task/metric', whatever the number of
    tasks (a single-task run's task is named after its preset: 'classification/accuracy')."""
    return f"{task}/{metric}"


def metric_names(cfg: RunConfig, templates: dict[str, PromptTemplate]) -> list[str]:
    """What eval.select.metric may name: val_loss, retention_ppl, the preference metrics under a preference
    objective, and each task's metrics on generated text ('task/metric')."""
    names = ["val_loss"] + (["retention_ppl"] if cfg.eval.retention.data else [])
    if cfg.objective.preference:  # measured on the held-out preference items (train/objectives.py)
        names += ["pref_loss", "reward_accuracy", "reward_margin"]
    if cfg.eval.during_training:
        for name, template in templates.items():
            names += [metric_key(name, c) for c in template.task.columns]
    return names


def resolve_metric(name: str, allowed: list[str]) -> str | None:
    """`name` as training logs it: itself, or the one task metric it names without the task ('accuracy' for
    'classification/accuracy'); None when it names none, or a metric several tasks measure."""
    if name in allowed:
        return name
    matches = [a for a in allowed if a.endswith("/" + name)]
    return matches[0] if len(matches) == 1 else None


def select_metric(cfg: RunConfig, templates: dict[str, PromptTemplate]) -> RunConfig:
    """cfg with eval.select.metric spelled as training logs it, or an error listing what may be chosen.

    Left unset, it is validation loss, except for one task with open answers (extraction, QA, translation,
    math, instructions) whose answers are generated during training: there the task's headline metric
    chooses the checkpoint. Loss and answer quality part ways on those tasks (on an 800-sentence NER set,
    validation entity F1 fell from 0.252 at step 25 to 0.070 at step 50 while validation loss still fell),
    while a closed label's loss follows its accuracy closely."""
    allowed = metric_names(cfg, templates)
    metric = cfg.eval.select.metric
    if "metric" not in cfg.eval.select.model_fields_set and cfg.eval.during_training and len(templates) == 1:
        name, template = next(iter(templates.items()))
        # GRPO learns the task's metric, so that metric chooses its checkpoint whatever the task
        if (template.label_field is None or cfg.objective.reinforcement) and not cfg.objective.preference:
            metric = metric_key(name, template.task.headline)
    chosen = resolve_metric(metric, allowed)
    if chosen is None:
        hint = "" if cfg.eval.during_training else " (eval.during_training=0 turns generated-text metrics off)"
        raise ConfigError("config", [f"eval.select.metric: '{cfg.eval.select.metric}' is not measured during training"
                                     f"{hint}; choose one of: {', '.join(allowed)}"])
    select = cfg.eval.select.model_copy(update={"metric": chosen})
    return cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"select": select})})


class TrainingEvaluation:
    """validation: task -> its validation samples; evaluators: task -> Evaluator. Measures retention before
    training (the guardrail's reference), at each evaluation, and after."""

    def __init__(self, cfg: RunConfig, tokenizer, validation: dict[str, list[Sample]], evaluators: dict[str, Evaluator],
                 device, probe: RetentionProbe | None = None):
        self.cfg, self.evaluators, self.device = cfg, evaluators, device
        self.batch_size = cfg.train.batch_size
        self.val_set = [s for samples in validation.values() for s in samples]
        self.subsets = {name: validation_subset(samples, cfg.eval.during_training, cfg.train.seed)
                        for name, samples in validation.items()}
        self.probe = probe  # read with the rest of the run's input (pipeline.prepare)
        self.plain = StepContext(tokenizer.pad_token_id, device, packing=False)
        self.retention: dict = {}

    @property
    def active(self) -> bool:
        return bool(self.val_set or self.probe)

    @property
    def guard(self):
        return self.probe.guard if self.probe else None

    def before(self, model) -> None:
        """The base model's retention (also on resume: the model is still the base here)."""
        if not self.probe:
            return
        main = distributed.world().main  # rank 0 measures; every rank's guardrail uses its figure
        self.retention = distributed.from_main(
            {"source": self.probe.source, **self._retention_point(model, "base")} if main else None)
        self.probe.base_ppl = self.retention["base_ppl"]
        console.print(f"Retention ({self.probe.source}, {len(self.probe.samples)} examples): "
                      f"base perplexity {self.probe.base_ppl:.2f}")

    def evaluate(self, model, ctx: StepContext, step: int) -> dict:
        bs = self.batch_size
        metrics = {"val_loss": validation_loss(model, self.val_set, bs, ctx)} if self.val_set else {}
        with ctx.eager():
            for name, subset in self.subsets.items():
                if subset:
                    evaluator = self.evaluators[name]
                    scores = evaluator.run(model, subset, f"validation @{step}").metrics
                    # the task's own figures; its costs (prompt tokens, seconds) are not a validation curve
                    metrics.update({metric_key(name, k): scores[k] for k in evaluator.task.columns
                                    if isinstance(scores.get(k), float)})
        if self.probe and step == 0 and self.probe.base_ppl is not None:  # the weights before() just measured
            metrics.update({"retention_ppl": self.probe.base_ppl, "retention_change": 0.0})
        elif self.probe:
            metrics.update(self.probe.measure(model, lambda m, s: validation_loss(m, s, bs, ctx)))
        return metrics

    @staticmethod
    def describe(metrics: dict) -> str:
        """An evaluation in one line, each task's figures together:
        'val_loss 0.231; classification: accuracy 0.875, macro_f1 0.861; retention ppl 6.53 (+18%)'."""
        # (task, run metric) -> figures, in the order they first appear: a task's figures stand together
        groups: dict[tuple[str, str], list[str]] = {}
        for k, v in metrics.items():
            if isinstance(v, float) and k not in ("retention_ppl", "retention_change"):
                task, _, metric = k.rpartition("/")
                groups.setdefault((task, "" if task else k), []).append(f"{metric} {v:.3f}")
        parts = [f"{task}: " + ", ".join(figures) if task else figures[0] for (task, _), figures in groups.items()]
        if "retention_ppl" in metrics:
            parts.append(f"retention ppl {metrics['retention_ppl']:.2f} ({metrics['retention_change']:+.0%})")
        return "; ".join(parts)

    def after(self, model, measured: dict | None = None) -> dict:
        """{source, base_ppl, final_ppl, change[, base_rouge_l, final_rouge_l]}, or {} without retention.
        measured: the evaluation of the step whose weights the model holds now (the last step, or the best one
        restored); its retention perplexity is the final one, not measured a second time."""
        if self.probe:
            self.retention.update(self._retention_point(model, "final", (measured or {}).get("retention_ppl")))
            self.retention["change"] = self.retention["final_ppl"] / self.retention["base_ppl"] - 1.0
        return self.retention

    def _retention_point(self, model, when: str, ppl: float | None = None) -> dict:
        bs, ctx = self.batch_size, self.plain
        if ppl is None:
            ppl = self.probe.perplexity(model, lambda m, s: validation_loss(m, s, bs, ctx))
        point = {f"{when}_ppl": ppl}
        if self.probe.spec.generate:
            first = next(iter(self.evaluators.values()))
            general = Evaluator(first.tokenizer, PromptTemplate(TemplateSpec(preset="instruction")), first.fmt, [],
                                first.spec, first.device, None)
            point[f"{when}_rouge_l"] = general.run(model, self.probe.samples, f"retention {when}").metrics["rouge_l"]
        return point


def validation_subset(samples: list[Sample], n: int, seed: int) -> list[Sample]:
    """A fixed, seeded subset of the validation split for generated-text metrics during training."""
    if n <= 0 or not samples:
        return []
    return random.Random(seed + 11).sample(samples, min(n, len(samples)))
