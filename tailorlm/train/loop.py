"""The one training loop. Methods (full, freezing, gradual unfreezing, LoRA, ...) are strategies that only
decide which parameters train and when; evaluation, checkpoints and guardrails plug in through Hooks.

Loss normalisation is exact under gradient accumulation: each optimizer step divides the summed token
losses of all its micro-batches by their total number of completion tokens, so accumulating 4 batches of 2
gives the same update as one batch of 8.

Resume is exact: batches are a pure function of (seed, epoch) and the checkpoint holds the position in the
epoch, the optimizer, schedule and RNG states, so a killed and resumed run ends with the same weights, bit
for bit, as one that never stopped.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from tailorlm.config import SelectSpec, TrainSpec
from tailorlm.data.batching import epoch_batches
from tailorlm.data.tokenize import Sample
from tailorlm.errors import TailorError
from tailorlm.models.methods import Strategy
from tailorlm.train.checkpoint import CheckpointStore, load_trainer, load_weights, rng_state, set_rng_state
from tailorlm.train.optim import make_optimizer, make_schedule
from tailorlm.train.selection import Selector
from tailorlm.train.step import StepContext, accumulate_gradients, fast_training
from tailorlm.ui import console, progress


@dataclass
class TrainResult:
    steps: int  # planned optimizer steps
    completed: int = 0  # steps actually taken (fewer when stopped early)
    train_loss: list[dict] = field(default_factory=list)  # {step, epoch, loss, lr}
    evaluations: list[dict] = field(default_factory=list)  # {step, val_loss, <task metric>..., retention_ppl}
    events: list[dict] = field(default_factory=list)  # {step, event}: unfreezing stages, early stop, resume
    seconds: float = 0.0
    tokens: int = 0  # real (non-padding) tokens seen
    best_step: int | None = None
    stopped_early: bool = False
    trainable: int = 0  # parameters the method trained at some point (all groups, for gradual unfreezing)
    parameters: int = 0

    @property
    def val_loss(self) -> list[dict]:
        return [{"step": e["step"], "loss": e["val_loss"]} for e in self.evaluations if "val_loss" in e]


@dataclass
class Hooks:
    """What the loop calls out to; every part is optional, so a bare train() is a plain training loop."""
    evaluate: Callable[[torch.nn.Module, StepContext, int], dict] | None = None  # metrics at an evaluation
    checkpoints: CheckpointStore | None = None
    select: SelectSpec = field(default_factory=SelectSpec)
    log: Callable[[dict, int], None] | None = None  # e.g. the tracker's log_metrics
    guard: Callable[[dict, int], None] | None = None  # raises TailorError to stop (retention guardrail)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def plan_steps(n_samples: int, spec: TrainSpec) -> tuple[int, int]:
    """(optimizer steps per epoch, total optimizer steps)."""
    per_epoch = math.ceil(math.ceil(n_samples / spec.batch_size) / spec.grad_accum)
    return per_epoch, spec.max_steps or per_epoch * spec.epochs


def train(model, strategy: Strategy, train_samples: list[Sample], spec: TrainSpec, lr: float, pad_id: int,
          device: torch.device, hooks: Hooks | None = None, resume: Path | None = None) -> TrainResult:
    seed_everything(spec.seed)
    with fast_training(model, spec, pad_id, device) as ctx:
        return _Run(model, strategy, train_samples, spec, lr, ctx, hooks or Hooks()).go(resume)


class _Run:
    """One training run's mutable state; `go` is the loop."""

    def __init__(self, model, strategy: Strategy, samples: list[Sample], spec: TrainSpec, lr: float,
                 ctx: StepContext, hooks: Hooks):
        self.model, self.strategy, self.samples, self.spec, self.ctx, self.hooks = model, strategy, samples, spec, ctx, hooks
        self.per_epoch, total = plan_steps(len(samples), spec)
        strategy.plan(total, self.per_epoch)
        self.optimizer = make_optimizer(strategy.param_groups(model, lr), spec)
        self.schedule = make_schedule(self.optimizer, spec, total)
        self.result = TrainResult(steps=total)
        self.selector = Selector.from_spec(hooks.select)
        self.step, self.epoch, self.position = 0, 0, 0  # next step; its epoch; its first batch in the epoch
        if not any(p.requires_grad for p in model.parameters()):
            raise TailorError("the method left no trainable parameters")

    def go(self, resume: Path | None) -> TrainResult:
        if resume is not None:
            self._restore(resume)
        spec, result = self.spec, self.result
        n_total = sum(p.numel() for p in self.model.parameters())
        n_train = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        console.print(f"Training {n_train:,} of {n_total:,} parameters ({n_train / n_total:.2%}) for {result.steps} "
                      f"steps: {len(self.samples)} samples, batch {spec.batch_size} x {spec.grad_accum} accumulation")
        if resume is None and self.hooks.evaluate and spec.eval_every:
            self._evaluate()  # the starting point: how the base model does
        self.model.train()
        start, seconds_before = time.perf_counter(), result.seconds
        with progress("train", result.steps) as advance:
            advance(self.step)
            while self.step < result.steps and not result.stopped_early:
                batches = epoch_batches(self.samples, spec.batch_size, spec.seed, self.epoch)
                while self.position < len(batches) and self.step < result.steps:
                    info = self._one_step(batches)
                    result.seconds = seconds_before + time.perf_counter() - start
                    info += self._maybe_evaluate_and_save(len(batches))
                    advance(1, info)
                    if result.stopped_early:
                        break
                if self.position >= len(batches):
                    self.epoch, self.position = self.epoch + 1, 0
        result.completed = self.step
        result.trainable = sum(p.numel() for p in self.strategy.checkpoint_params(self.model).values())
        result.parameters = n_total
        self.model.eval()
        return result

    def _one_step(self, batches: list[list[int]]) -> str:
        spec, step = self.spec, self.step
        change = self.strategy.on_step(step, self.model)
        if change:
            self.result.events.append({"step": step, "event": change})
            console.print(change)
        group = [[self.samples[i] for i in idx] for idx in batches[self.position:self.position + spec.grad_accum]]
        loss, tokens = accumulate_gradients(self.model, group, self.ctx)
        params = self.strategy.trainable(self.model)
        # clip_grad_norm_ with an infinite bound only measures (its scale factor is exactly 1)
        norm = float(torch.nn.utils.clip_grad_norm_(params, spec.max_grad_norm or float("inf")))
        if not (math.isfinite(loss) and math.isfinite(norm)):
            self._fail_non_finite("loss" if not math.isfinite(loss) else "gradient norm",
                                  loss if not math.isfinite(loss) else norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.schedule.step()
        self.step, self.position = step + 1, self.position + spec.grad_accum
        self.result.tokens += tokens
        lr = self.schedule.get_last_lr()[0]
        epoch = round(self.epoch + min(self.position, len(batches)) / len(batches), 3)
        self.result.train_loss.append({"step": self.step, "epoch": epoch, "loss": loss, "lr": lr})
        if self.hooks.log:
            self.hooks.log({"train/loss": loss, "train/lr": lr, "train/grad_norm": norm}, self.step)
        return f"loss {loss:.3f}"

    def _fail_non_finite(self, what: str, value: float) -> None:
        last = self.hooks.checkpoints.latest() if self.hooks.checkpoints else None
        kept = (f"; the last good checkpoint is {last} (resume from it with a lower train.lr: "
                f"`tailor run --resume {last.parent.parent} train.lr=...`)") if last else ""
        raise TailorError(f"the training {what} became {value} at step {self.step + 1}; lower train.lr or check "
                          f"the data{kept}")

    def _maybe_evaluate_and_save(self, n_batches: int) -> str:
        spec, step, total = self.spec, self.step, self.result.steps
        last = step >= total
        eval_now = bool(self.hooks.evaluate) and ((spec.eval_every and step % spec.eval_every == 0) or last)
        info = ""
        if eval_now:
            metrics = self._evaluate()
            info = " " + " ".join(f"{k} {v:.3f}" for k, v in metrics.items() if isinstance(v, float))
        every = spec.checkpoint_every
        if self.hooks.checkpoints and (eval_now or last or (every and step % every == 0)):
            self._save(n_batches)
        if eval_now and self.hooks.guard:
            self.hooks.guard(self.result.evaluations[-1], step)  # after the save: the checkpoint is kept
        return info

    def _evaluate(self) -> dict:
        metrics = self.hooks.evaluate(self.model, self.ctx, self.step)
        self.model.train()
        self.result.evaluations.append({"step": self.step, **metrics})
        if self.hooks.log:
            self.hooks.log({f"val/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}, self.step)
        if self.step > 0:  # the base model is the reference, not a candidate
            if self.selector.update(self.step, metrics):
                self.result.best_step = self.step
            elif self.selector.should_stop:
                self.result.stopped_early = True
                event = (f"early stop at step {self.step}: {self.selector.metric} has not improved for "
                         f"{self.selector.bad_evals} evaluations (best {self.selector.best_value:.4f} at step "
                         f"{self.selector.best_step})")
                self.result.events.append({"step": self.step, "event": event})
                console.print(f"[yellow]{event}[/]")
        return metrics

    def _save(self, n_batches: int) -> None:
        epoch, position = (self.epoch + 1, 0) if self.position >= n_batches else (self.epoch, self.position)
        trainer = {"optimizer": self.optimizer.state_dict(), "schedule": self.schedule.state_dict(), "rng": rng_state()}
        state = {"step": self.step, "epoch": epoch, "position": position, "selector": self.selector.state(),
                 "result": asdict(self.result)}
        self.hooks.checkpoints.save(self.step, self.strategy.checkpoint_params(self.model), trainer, state,
                                    self.result.best_step)

    def _restore(self, path: Path) -> None:
        trainer, state = load_trainer(path)
        self.strategy.on_step(state["step"], self.model)  # the unfreezing stage the run had reached
        load_weights(path, self.strategy.checkpoint_params(self.model))
        self.optimizer.load_state_dict(trainer["optimizer"])
        self.schedule.load_state_dict(trainer["schedule"])
        self.step, self.epoch, self.position = state["step"], state["epoch"], state["position"]
        self.selector = Selector.from_state(state["selector"])
        self.result = TrainResult(**state["result"])
        self.result.events.append({"step": self.step, "event": f"resumed from {path.name}"})
        set_rng_state(trainer["rng"])  # last: nothing above may draw from the generators
        console.print(f"Resumed from {path} at step {self.step} of {self.result.steps}")


def restore_best(model, strategy: Strategy, store: CheckpointStore | None, result: TrainResult) -> Path | None:
    """Put the best checkpoint's weights back when it is not the last step; returns its path."""
    if store is None or result.best_step is None or result.best_step == result.completed:
        return None
    best = store.best()
    if best is None:
        return None
    load_weights(best, strategy.checkpoint_params(model))
    return best
