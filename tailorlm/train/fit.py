"""The training phase of a run: the method's strategy, crash-safe checkpoints and resume, the best checkpoint
restored at the end, and the per-example losses that point at mislabeled data. What runs at each evaluation
(validation loss, generated-text metrics, retention) is passed in (eval/during_training.py): train/ does not
import eval/.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import torch

from tailorlm.config import RunConfig
from tailorlm.data.batching import collate, eval_batches
from tailorlm.data.samples import Preference, Sample
from tailorlm.kernels.loss import per_sample_loss
from tailorlm.models.methods import make_strategy
from tailorlm.train.checkpoint import CheckpointStore
from tailorlm.train.loop import Hooks, TrainResult, restore_best, train
from tailorlm.train.objectives import make_objective
from tailorlm.train.step import StepContext
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


class Evaluation(Protocol):
    """What runs at each evaluation (eval/during_training.py builds it): the loop knows only these calls."""
    active: bool
    guard: Callable | None

    def before(self, model) -> None: ...
    def evaluate(self, model, ctx: StepContext, step: int) -> dict: ...
    def describe(self, metrics: dict) -> str: ...
    def after(self, model, measured: dict | None) -> dict: ...


def fit(cfg: RunConfig, model, tokenizer, train_set: list, out_dir: Path, device: torch.device,
        resume: bool = False, log=None, evaluation: Evaluation | None = None,
        held_out: list[Preference] = (), sampler=None) -> Fit | None:
    """Train `model` on `train_set` with the method's strategy and the config's objective (Samples, or
    Preference items with their held-out ones); `evaluation` runs at each evaluation step; `sampler` answers
    and rewards GRPO's prompts (eval/rollouts.py).
    Under torchrun every process calls this; only rank 0 gets a Fit back."""
    strategy = make_strategy(cfg.method)
    model = strategy.prepare(model)
    pad_id = tokenizer.pad_token_id
    if evaluation:
        evaluation.before(model)
    store = CheckpointStore(out_dir / "checkpoints", cfg.train.keep_checkpoints)
    start = store.latest(verify=True) if resume else None
    if resume and start is None:
        console.print("No complete checkpoint yet: training starts from the beginning")
    active = evaluation is not None and evaluation.active
    hooks = Hooks(evaluate=evaluation.evaluate if active else None, checkpoints=store, select=cfg.eval.select,
                  log=log, guard=evaluation.guard if active else None,
                  describe=evaluation.describe if active else None)
    objective = make_objective(cfg.objective, sampler)
    history = train(model, strategy, train_set, cfg.train, cfg.lr, pad_id, device, hooks, start, objective, held_out)
    if history.model is None:  # another process under torchrun: rank 0 finishes the run alone
        return None
    model = history.model
    restored = restore_best(model, strategy, store, history)
    if restored:
        console.print(f"Restored the best checkpoint ({cfg.eval.select.metric}) from step {history.best_step}: {restored}")
    saved = strategy.save(model, tokenizer, out_dir)
    held = history.best_step if restored else history.completed  # the step whose weights the model holds now
    retention = evaluation.after(model, next((e for e in history.evaluations if e["step"] == held), None)) \
        if evaluation else {}
    losses = example_losses(model, objective.answers(train_set), cfg.train.batch_size, pad_id, device) \
        if cfg.eval.example_losses else []
    return Fit(model, history, saved, restored, retention, losses)


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
