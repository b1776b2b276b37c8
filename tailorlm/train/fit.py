"""The training phase of a run: the method's strategy, what runs at each evaluation (validation loss, the task
metric on generated validation text, retention), crash-safe checkpoints and resume, the best checkpoint
restored at the end, and the per-example losses that point at mislabeled data.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch

from tailorlm.config import RunConfig
from tailorlm.data.batching import collate, eval_batches
from tailorlm.data.tokenize import Sample
from tailorlm.errors import ConfigError
from tailorlm.eval.retention import RetentionProbe
from tailorlm.kernels.loss import per_sample_loss
from tailorlm.models.methods import make_strategy
from tailorlm.train import distributed
from tailorlm.train.checkpoint import CheckpointStore
from tailorlm.train.loop import Hooks, TrainResult, restore_best, train
from tailorlm.train.step import StepContext, validation_loss
from tailorlm.ui import console

TOP_LOSSES = 10  # highest-loss training examples listed in the report


@dataclass
class Fit:
    model: torch.nn.Module
    history: TrainResult
    saved: Path
    restored: Path | None  # the best checkpoint put back, when it was not the last step
    retention: dict  # {source, base_ppl, final_ppl, change[, base_rouge_l, final_rouge_l]}
    example_losses: list[dict]  # every training example, highest loss first


def metric_names(cfg: RunConfig, tasks: dict[str, object]) -> list[str]:
    """What eval.select.metric may name: val_loss, retention_ppl, and each task's metrics on generated text
    (prefixed 'task/' in multi-task runs)."""
    names = ["val_loss"] + (["retention_ppl"] if cfg.eval.retention.data else [])
    if cfg.eval.during_training:
        for name, template in tasks.items():
            names += [f"{name}/{c}" if cfg.tasks else c for c in template.task.columns]
    return names


def check_select(cfg: RunConfig, tasks: dict[str, object]) -> None:
    allowed = metric_names(cfg, tasks)
    if cfg.eval.select.metric not in allowed:
        hint = "" if cfg.eval.during_training else " (eval.during_training=0 turns generated-text metrics off)"
        raise ConfigError("config", [f"eval.select.metric: '{cfg.eval.select.metric}' is not measured during training"
                                     f"{hint}; choose one of: {', '.join(allowed)}"])


def fit(cfg: RunConfig, model, tokenizer, train_set: list[Sample], validation: dict[str, list[Sample]],
        evaluators: dict, out_dir: Path, device: torch.device, resume: bool = False, log=None) -> Fit | None:
    """validation: task name -> its validation samples; evaluators: task name -> Evaluator (eval/evaluate.py).
    Under torchrun every process calls this; only rank 0 gets a Fit back."""
    strategy = make_strategy(cfg.method)
    model = strategy.prepare(model)
    pad_id = tokenizer.pad_token_id
    val_set = [s for samples in validation.values() for s in samples]
    first = next(iter(evaluators.values()))
    probe = RetentionProbe.load(cfg.eval.retention, tokenizer, cfg.template, cfg.train.seed)
    plain = StepContext(pad_id, device, packing=False)
    bs = cfg.train.batch_size
    retention = {}
    if probe:  # the base model's score, the guardrail's reference (also on resume: the model is still the base here)
        main = distributed.world().main  # rank 0 measures; every rank's guardrail uses its figure
        retention = distributed.from_main(
            {"source": probe.source, **_retention_point(probe, model, plain, bs, first, "base")} if main else None)
        probe.base_ppl = retention["base_ppl"]
        console.print(f"Retention ({probe.source}, {len(probe.samples)} examples): base perplexity {probe.base_ppl:.2f}")
    subsets = {name: _subset(samples, cfg.eval.during_training, cfg.train.seed) for name, samples in validation.items()}

    def evaluate(model, ctx: StepContext, step: int) -> dict:
        metrics = {"val_loss": validation_loss(model, val_set, bs, ctx)} if val_set else {}
        with ctx.eager():
            for name, subset in subsets.items():
                if subset:
                    scores = evaluators[name].run(model, subset, f"validation @{step}").metrics
                    metrics.update({f"{name}/{k}" if cfg.tasks else k: v for k, v in scores.items()
                                    if isinstance(v, float)})
        if probe:
            metrics.update(probe.measure(model, lambda m, s: validation_loss(m, s, bs, ctx)))
        return metrics

    store = CheckpointStore(out_dir / "checkpoints", cfg.train.keep_checkpoints)
    start = store.latest(verify=True) if resume else None
    if resume and start is None:
        console.print("No complete checkpoint yet: training starts from the beginning")
    hooks = Hooks(evaluate=evaluate if (val_set or probe) else None, checkpoints=store, select=cfg.eval.select,
                  log=log, guard=probe.guard if probe else None)
    history = train(model, strategy, train_set, cfg.train, cfg.lr, pad_id, device, hooks, start)
    if history.model is None:  # another process under torchrun: rank 0 finishes the run alone
        return None
    model = history.model
    restored = restore_best(model, strategy, store, history)
    if restored:
        console.print(f"Restored the best checkpoint ({cfg.eval.select.metric}) from step {history.best_step}: {restored}")
    saved = strategy.save(model, tokenizer, out_dir)
    if probe:
        retention.update(_retention_point(probe, model, plain, bs, first, "final"))
        retention["change"] = retention["final_ppl"] / retention["base_ppl"] - 1.0
    losses = example_losses(model, train_set, bs, pad_id, device)
    return Fit(model, history, saved, restored, retention, losses)


def _retention_point(probe: RetentionProbe, model, ctx: StepContext, bs: int, evaluator, when: str) -> dict:
    point = {f"{when}_ppl": probe.perplexity(model, lambda m, s: validation_loss(m, s, bs, ctx))}
    if probe.spec.generate:
        from tailorlm.eval.evaluate import Evaluator
        from tailorlm.data.templates import PromptTemplate
        from tailorlm.config import TemplateSpec

        general = Evaluator(evaluator.tokenizer, PromptTemplate(TemplateSpec(preset="instruction")), evaluator.fmt, [],
                            evaluator.spec, evaluator.device, None)
        point[f"{when}_rouge_l"] = general.run(model, probe.samples, f"retention {when}").metrics["rouge_l"]
    return point


def _subset(samples: list[Sample], n: int, seed: int) -> list[Sample]:
    """A fixed, seeded subset of the validation split for generated-text metrics during training."""
    if n <= 0 or not samples:
        return []
    return random.Random(seed + 11).sample(samples, min(n, len(samples)))


@torch.no_grad()
def example_losses(model, samples: list[Sample], batch_size: int, pad_id: int, device) -> list[dict]:
    """Loss per completion token of every training example under the final model, highest first. Examples
    the model still cannot fit after training are often mislabeled or ambiguous."""
    model.eval()
    rows = []
    for idx in eval_batches(samples, batch_size):
        batch = {k: v.to(device) for k, v in collate([samples[i] for i in idx], pad_id).items()}
        sums, counts = per_sample_loss(model, batch)
        for i, total, n in zip(idx, sums.tolist(), counts.tolist()):
            ex = samples[i].example
            rows.append({"loss": total / max(n, 1), "where": ex.get("_where"),
                         "example": {k: v for k, v in ex.items() if not k.startswith("_")}})
    return sorted(rows, key=lambda r: -r["loss"])
