"""The first stage: data -> template -> tokens -> preflight, for every task of a run, before any output is
written or any weight is loaded.

A run trains a list of tasks (`tasks:` in the config, or the config's own data and template as one task named
after its preset), so nothing downstream asks how many there are: every task has its own folder, metrics
section and 'task/metric' names.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Mapping

from tailorlm.config import RunConfig
from tailorlm.data.dataset import Splits, load_splits
from tailorlm.data.mixing import mix, mixing_shares
from tailorlm.data.preflight import Preflight, plot_lengths, run_preflight, show
from tailorlm.data.samples import Preference, Sample
from tailorlm.data.templates import PromptTemplate
from tailorlm.data.tokenize import ChatFormat, EncodeReport, encode_examples, encode_preference_examples
from tailorlm.errors import ConfigError, DataError, TailorError
from tailorlm.eval.during_training import select_metric
from tailorlm.eval.retention import RetentionProbe
from tailorlm.models.loading import inspect_model, load_tokenizer, resolve_device
from tailorlm.rundir import write_json
from tailorlm.tasks.qa import is_extractive
from tailorlm.ui import console, stage


@dataclass
class TaskData:
    """One task, everything known before the model's weights are loaded: examples, tokens, the preflight."""
    name: str
    cfg: RunConfig  # the run's config with this task's data and template
    template: PromptTemplate
    splits: Splits
    fmt: ChatFormat
    encoded: dict[str, list[Sample]]  # train / validation / test
    reports: dict[str, EncodeReport]
    preflight: Preflight
    weight: float = 1.0  # share of training samples under mixing.strategy=weights
    pairs: dict[str, list[Preference]] = field(default_factory=dict)  # split -> items, under a preference objective

    @property
    def labels(self) -> list[str]:
        return self.splits.labels

    @property
    def extractive(self) -> bool:
        """Whether the answers are spans of an input field (QA whose training answers sit in their contexts)."""
        return self.template.task.span_answer is not None and is_extractive(self.splits.train)


@dataclass
class Prepared:
    """Every task of a run, prepared."""
    cfg: RunConfig
    tasks: dict[str, TaskData]
    tokenizer: object
    # The general-instruction set whose perplexity shows forgetting (eval.retention.data), read and tokenized
    # here with the rest of the user's input, so a bad one fails before the run folder or the model exists.
    retention: RetentionProbe | None = None

    @staticmethod
    def tagged(rows: list[dict], task: str) -> list[dict]:
        """Prediction rows, each marked with its task."""
        return [{**r, "task": task} for r in rows]

    def held_out_pairs(self) -> list[Preference]:
        """Validation preference items, scored at every evaluation (reward accuracy and margin)."""
        return [p for t in self.tasks.values() for p in t.pairs.get("validation", [])]

    def validation(self) -> dict[str, list[Sample]]:
        return {name: t.encoded["validation"] for name, t in self.tasks.items()}

    @cached_property
    def training_set(self) -> list[Sample]:
        """The tasks' training samples mixed per cfg.mixing (one task mixes to itself)."""
        cfg = self.cfg
        if cfg.objective.preference:  # one task (prepare checks): its preference items
            return next(iter(self.tasks.values())).pairs["train"]
        trains = [t.encoded["train"] for t in self.tasks.values()]
        shares = mixing_shares([len(t) for t in trains], [t.weight for t in self.tasks.values()],
                               cfg.mixing.strategy, cfg.mixing.temperature)
        mixed = mix(trains, shares, cfg.train.seed)
        console.print(f"training set: {len(mixed)} samples: " + ", ".join(
            f"{n} {share:.0%}" for n, share in zip(self.tasks, shares)))
        return mixed


def task_configs(cfg: RunConfig) -> dict[str, RunConfig]:
    """One run config per task (RunConfig.task_set: a single-task run is a set of one)."""
    return {t.name: cfg.for_task(t) for t in cfg.task_set()}


def prepare(cfg: RunConfig, given: Mapping[str, object] | None = None, tokenizer=None,
            n_params: int | None = None) -> Prepared:
    """Every task's data, tokens and preflight. `given` holds in-memory data that `memory:NAME` sources name;
    `tokenizer` and `n_params` stand in for the model files when the caller passes a loaded model."""
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg.model)  # a wrong path is reported now
    if n_params is None:
        n_params = inspect_model(cfg.model)
    specs = cfg.task_set()
    # Preference items have no mixing rule yet (shares of pairs from different tables): one task's table.
    if cfg.objective.name != "sft" and len(specs) > 1:
        raise ConfigError("config", [f"objective.name: {cfg.objective.name} trains one task; tasks: (multi-task "
                                     f"mixing) is for objective.name=sft"])
    if cfg.objective.reinforcement and (problems := grpo_problems(cfg)):
        raise ConfigError("config", problems)
    # eval.select.metric as training logs it ('accuracy' -> 'classification/accuracy'), checked before any output
    cfg = select_metric(cfg, {t.name: PromptTemplate(t.template) for t in specs})
    tasks = {t.name: prepare_task(t.name, cfg.for_task(t), tokenizer, n_params, given, weight=t.weight)
             for t in specs}
    retention = RetentionProbe.load(cfg.eval.retention, tokenizer, cfg.template, cfg.train.seed)
    return Prepared(cfg, tasks, tokenizer, retention)


def prepare_task(name: str, cfg: RunConfig, tokenizer, n_params: int, given: Mapping[str, object] | None = None,
                 weight: float = 1.0) -> TaskData:
    stage(f"Data: {name}")
    template = PromptTemplate(cfg.template)
    label_field = template.label_field
    if template.task.label_field and label_field is None:
        raise TailorError("template.completion must use {{ label }}: the classification preset learns to answer the label")
    objective = cfg.objective
    preference = ("unpaired" if objective.name == "kto" else "pairs") if objective.preference else None
    splits = load_splits(cfg.data, template.fields, label_field, template.task, given=given, preference=preference)
    for split in ("train", "validation", "test"):
        console.print(f"{split:>10}: {len(splits[split]):5d} examples from {splits.sources[split]}")
    for split, reasons in splits.skipped.items():
        for reason, count in reasons.items():
            console.print(f"[yellow]{split:>10}: skipped {count} row(s): {reason}[/]")
    if splits.labels:
        console.print(f"{'labels' if label_field else 'types':>10}: {', '.join(splits.labels)}")
    # Render every example once now, so a template error surfaces before any output or model load.
    for ex in splits.train + splits.validation + splits.test:
        template.prompt(ex, splits.labels), template.completion(ex)

    fmt = ChatFormat(tokenizer, cfg.template)
    encoded, reports, pairs = {}, {}, {}
    for split in ("train", "validation", "test"):
        if preference:  # items to compare; the training split has nothing else, preflight measures its chosen
            pairs[split], report = encode_preference_examples(splits[split], template, fmt, splits.labels,
                                                              cfg.template, cfg.train.seed)
            if split == "train":
                encoded[split], reports[split] = [p.chosen for p in pairs[split]], report
            if split == "train" or pairs[split]:  # a held-out split may hold plain task rows only
                console.print(f"{split:>10}: {len(pairs[split])} {'pairs' if preference == 'pairs' else 'answers'} "
                              f"({report.summary()})")
        if split not in encoded:
            # Held-out conversations are scored on their last reply: its validation loss is that reply's.
            encoded[split], reports[split] = encode_examples(splits[split], template, fmt, splits.labels,
                                                             cfg.template, None if split == "train" else "last_assistant")
            console.print(f"{split:>10}: {reports[split].summary()}")
        if not encoded[split]:
            raise DataError(splits.sources[split], None,
                            f"no {split} sample fits template.max_length={cfg.template.max_length}")

    stage("Preflight")
    pf = run_preflight(cfg, splits, encoded, reports, template, tokenizer, n_params, resolve_device(cfg.train.device))
    show(pf, tokenizer, encoded["train"])
    return TaskData(name, cfg, template, splits, fmt, encoded, reports, pf, weight, pairs)


def save_data_report(folder: Path, data: TaskData) -> None:
    """preflight.json, data_report.json and token_lengths.png of one task, into `folder` (a run's, or any)."""
    splits, reports = data.splits, data.reports
    write_json(folder / "preflight.json", {"findings": data.preflight.findings, **data.preflight.facts})
    plot_lengths(folder / "token_lengths.png", data.encoded["train"], data.cfg.template.max_length)
    write_json(folder / "data_report.json", {
        "sources": splits.sources, "labels": splits.labels, "skipped_rows": splits.skipped,
        "splits": {n: {"examples": len(splits[n]), "samples": reports[n].kept, "truncated": reports[n].truncated,
                       "dropped": dict(reports[n].dropped)} for n in data.encoded},
        "train_tokens_per_epoch": sum(len(s) for s in data.encoded["train"])})


def grpo_problems(cfg: RunConfig) -> list[str]:
    """Settings GRPO cannot honour, said before any model is loaded."""
    problems, grpo, train = [], cfg.objective.grpo, cfg.train
    if cfg.objective.strength > 0 and cfg.method.name not in ("lora", "qlora"):
        problems.append(f"objective.beta: {cfg.objective.strength} needs method lora or qlora under grpo: the starting "
                        f"model is the base with the adapter off (full weights would need a second copy); set it "
                        f"to 0 or use LoRA")
    if train.micro_batch_tokens:
        problems.append("train.micro_batch_tokens: grpo samples group_size answers per prompt, so a prompt's tokens "
                        "do not size its micro-batch; leave it unset (batch_size and grad_accum set the step)")
    if train.distributed.strategy == "fsdp":
        problems.append("train.distributed.strategy: fsdp: grpo samples answers of different lengths on each process, "
                        "which FSDP's per-block gathers cannot follow; use ddp")
    for key in ("eval_every", "checkpoint_every", "max_steps"):
        value = getattr(train, key)
        if grpo.num_iterations > 1 and value and value % grpo.num_iterations:
            problems.append(f"train.{key}: {value} is not a multiple of objective.grpo.num_iterations "
                            f"({grpo.num_iterations}): evaluations and checkpoints fall between groups")
    return problems
