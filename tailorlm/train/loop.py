"""The one training loop. Methods (full, freezing, gradual unfreezing, LoRA, ...) are strategies that only
decide which parameters train and when; evaluation, checkpoints and guardrails plug in through Hooks.

Loss normalisation is exact under gradient accumulation: each optimizer step divides the summed token
losses of all its micro-batches by their total number of completion tokens, so accumulating 4 batches of 2
gives the same update as one batch of 8.

Resume is exact: batches are a pure function of (seed, epoch) and the checkpoint holds the position in the
epoch, the optimizer, schedule and RNG states, so a killed and resumed run ends with the same weights, bit
for bit, as one that never stopped.

Under torchrun the same loop runs on every process; distributed.py splits each global batch and keeps
checkpoints and decisions independent of the process count.
"""
from __future__ import annotations

import copy
import math
import random
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from tailorlm.config import SelectSpec, TrainSpec
from tailorlm.data.batching import epoch_batches
from tailorlm.data.samples import Preference
from tailorlm.errors import TailorError
from tailorlm.models.methods import Strategy
from tailorlm.train import distributed
from tailorlm.train.distributed import Wrapped
from tailorlm.train.objectives import Objective, TokenLoss
from tailorlm.train.checkpoint import CheckpointStore, load_trainer, load_weights, rng_state, set_rng_state
from tailorlm.train.optim import make_optimizer, make_schedule
from tailorlm.train.selection import Selector
from tailorlm.train.step import StepContext, accumulate_gradients, fast_training
from tailorlm.ui import console, progress


@dataclass
class TrainResult:
    """What a run did, and the plain trained model (rank 0's gathered copy under FSDP, None on the other
    ranks). A checkpoint stores the figures (figures()), never the model."""
    steps: int  # planned optimizer steps
    completed: int = 0  # steps actually taken (fewer when stopped early)
    train_loss: list[dict] = field(default_factory=list)  # {step, epoch, loss, lr, grad_norm (before clipping)}
    evaluations: list[dict] = field(default_factory=list)  # {step, val_loss, <task metric>..., retention_ppl}
    events: list[dict] = field(default_factory=list)  # {step, event}: unfreezing stages, early stop, resume
    seconds: float = 0.0  # the whole training phase: steps, evaluations during training, checkpoints
    step_seconds: float = 0.0  # the optimizer steps alone: the basis of tokens/s
    tokens: int = 0  # real (non-padding) tokens seen
    best_step: int | None = None
    stopped_early: bool = False
    trainable: int = 0  # parameters the method trained at some point (all groups, for gradual unfreezing)
    parameters: int = 0
    model: torch.nn.Module | None = field(default=None, repr=False, compare=False)  # set when training ends

    def figures(self) -> dict:
        """Every field but the model, as a checkpoint stores them (and TrainResult(**figures) restores them)."""
        return {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self) if f.name != "model"}

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
    describe: Callable[[dict], str] | None = None  # an evaluation's figures as one line for the terminal


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def plan_steps(n_samples: int, spec: TrainSpec) -> tuple[int, int]:
    """(optimizer steps per epoch, total optimizer steps)."""
    per_epoch = math.ceil(math.ceil(n_samples / spec.batch_size) / spec.grad_accum)
    return per_epoch, spec.max_steps or per_epoch * spec.epochs


def planned_tokens(train_samples: list, spec: TrainSpec) -> int:
    """The tokens the run will train on, every epoch (a step's share of the last one counted)."""
    per_epoch, total = plan_steps(len(train_samples), spec)
    return round(sum(map(len, train_samples)) * total / max(per_epoch, 1))


def train(model, strategy: Strategy, train_samples: list, spec: TrainSpec, lr: float, pad_id: int,
          device: torch.device, hooks: Hooks | None = None, resume: Path | None = None,
          objective: Objective | None = None, held_out: list[Preference] = ()) -> TrainResult:
    """Train on `train_samples` under `objective` (objectives.py; SFT's token loss by default): Samples, or
    Preference items under a preference objective, whose held-out items are scored at every evaluation."""
    seed_everything(spec.seed)
    saved = None
    if resume is not None:  # weights go in before FSDP shards them
        saved = load_trainer(resume)
        strategy.on_step(saved[1]["step"], model)  # the unfreezing stage the run had reached
        load_weights(resume, strategy.checkpoint_params(model))
    wrapped = Wrapped(model, device)
    with fast_training(wrapped.module, spec, pad_id, device, planned_tokens(train_samples, spec)) as ctx:
        run = _Run(wrapped, strategy, train_samples, spec, lr, ctx, hooks or Hooks(), objective or TokenLoss(),
                   list(held_out))
        if saved:
            run.restore(resume, *saved)
        else:
            run.attach_references()
        result = run.go()
        result.model = wrapped.finished(strategy.checkpoint_params(wrapped.module))
    return result


class _Run:
    """One training run's mutable state; `go` is the loop."""

    def __init__(self, wrapped: Wrapped, strategy: Strategy, samples: list, spec: TrainSpec, lr: float,
                 ctx: StepContext, hooks: Hooks, objective: Objective, held_out: list = ()):
        self.wrapped, self.model = wrapped, wrapped.module
        self.objective, self.held_out = objective, held_out
        # evaluations run when something is measured: the run's hooks, or the objective's held-out items
        self.evaluating = bool(hooks.evaluate) or bool(held_out)
        self.strategy, self.samples, self.spec, self.ctx, self.hooks = strategy, samples, spec, ctx, hooks
        self.world = distributed.world()
        model = self.model
        self.per_epoch, total = plan_steps(len(samples), spec)
        self.repeats = objective.repeats  # each group of batches trains this many steps (GRPO's num_iterations)
        if self.repeats > 1:
            self.per_epoch *= self.repeats
            total = spec.max_steps or total * self.repeats
        strategy.plan(total, self.per_epoch)
        self.optimizer = make_optimizer(strategy.param_groups(model, lr), spec)
        self.schedule = make_schedule(self.optimizer, spec, total)
        self.result = TrainResult(steps=total)
        self.selector = Selector.from_spec(hooks.select)
        self.step, self.epoch, self.position = 0, 0, 0  # next step; its epoch; its first batch in the epoch
        self.resumed = False
        if not any(p.requires_grad for p in model.parameters()):
            raise TailorError("the method left no trainable parameters")

    def go(self) -> TrainResult:
        spec, result = self.spec, self.result
        n_total = sum(p.numel() for p in self.model.parameters())
        n_train = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        procs = f" over {self.world.size} processes ({self.world.mode})" if self.world.active else ""
        console.print(f"Training {n_train:,} of {n_total:,} parameters ({n_train / n_total:.2%}) for {result.steps} "
                      f"steps: {len(self.samples)} {self.objective.unit_name()}, batch {spec.batch_size} x {spec.grad_accum} accumulation"
                      f"{procs}")
        start, seconds_before = time.perf_counter(), result.seconds
        if not self.resumed and self.evaluating and spec.eval_every and spec.eval_at_start:
            self._evaluate()  # the starting point: how the base model does
        self.model.train()
        with progress("train", result.steps, done=self.step) as advance:  # a resumed run starts at its step
            while self.step < result.steps and not result.stopped_early:
                batches = epoch_batches(self.samples, spec.batch_size, spec.seed, self.epoch)
                while self.position < len(batches) and self.step < result.steps:
                    began = time.perf_counter()
                    loss = self._one_step(batches)
                    result.step_seconds += time.perf_counter() - began
                    result.seconds = seconds_before + time.perf_counter() - start  # as of this step's checkpoint
                    # rank 0's clock decides, so every process stops at the same step
                    out_of_time = bool(spec.max_seconds) and distributed.from_main(
                        time.perf_counter() - start >= spec.max_seconds)
                    if out_of_time and self.step < result.steps:
                        result.stopped_early = True
                        event = f"time limit: stopped at step {self.step} after {spec.max_seconds:g} s (train.max_seconds)"
                        result.events.append({"step": self.step, "event": event})
                        console.print(f"[yellow]{event}[/]")
                    self._maybe_evaluate_and_save(len(batches), out_of_time)
                    advance(1, loss)
                    if result.stopped_early:
                        break
                if self.position >= len(batches):
                    self.epoch, self.position = self.epoch + 1, 0
        result.seconds = seconds_before + time.perf_counter() - start
        result.completed = self.step
        result.trainable = sum(p.numel() for p in self.strategy.checkpoint_params(self.model).values())
        result.parameters = n_total
        self.model.eval()
        return result

    def _one_step(self, batches: list[list[int]]) -> str:
        """One optimizer step; the progress bar's text (the step's loss)."""
        spec, step = self.spec, self.step
        change = self.strategy.on_step(step, self.model)
        if change:
            self.result.events.append({"step": step, "event": change})
            console.print(change)
            self.wrapped.refresh()
        group = [[self.samples[i] for i in idx] for idx in batches[self.position:self.position + spec.grad_accum]]
        self.objective.begin_step(group, self.wrapped.run, self.ctx)
        loss, tokens = accumulate_gradients(self.wrapped.forward, group, self.ctx, self.wrapped.no_sync,
                                            objective=self.objective)
        params = self.strategy.trainable(self.model)
        # clip_grad_norm_ with an infinite bound only measures (its scale factor is exactly 1)
        norm = distributed.scalar(torch.nn.utils.clip_grad_norm_(params, spec.max_grad_norm or float("inf")))
        if not (math.isfinite(loss) and math.isfinite(norm)):
            self._fail_non_finite("loss" if not math.isfinite(loss) else "gradient norm",
                                  loss if not math.isfinite(loss) else norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.schedule.step()
        self.step = step + 1
        if self.step % self.repeats == 0:  # the group has had its steps: the next one
            self.position += spec.grad_accum
        self.result.tokens += tokens
        lr = self.schedule.get_last_lr()[0]
        epoch = round(self.epoch + min(self.position, len(batches)) / len(batches), 3)
        figures = self.objective.figures()  # GRPO: the step's rewards
        self.result.train_loss.append({"step": self.step, "epoch": epoch, "loss": loss, "lr": lr, "grad_norm": norm,
                                       **figures})
        if self.hooks.log and self.world.main:
            self.hooks.log({"train/loss": loss, "train/lr": lr, "train/grad_norm": norm,
                            **{f"train/{k}": v for k, v in figures.items()}}, self.step)
        return f"loss {loss:.3f}" + (f", reward {figures['reward']:.3f}" if "reward" in figures else "")

    def _fail_non_finite(self, what: str, value: float) -> None:
        last = self.hooks.checkpoints.latest() if self.hooks.checkpoints else None
        kept = (f"; the last good checkpoint is {last} (resume from it with a lower train.lr: "
                f"`tailor run --resume {last.parent.parent} train.lr=...`)") if last else ""
        raise TailorError(f"the training {what} became {value} at step {self.step + 1}; lower train.lr or check "
                          f"the data{kept}")

    def _maybe_evaluate_and_save(self, n_batches: int, out_of_time: bool = False) -> None:
        spec, step, total = self.spec, self.step, self.result.steps
        last = step >= total or out_of_time  # a time limit ends training here: evaluated and saved as the last step
        eval_now = self.evaluating and ((spec.eval_every and step % spec.eval_every == 0) or last)
        if eval_now:
            self._evaluate()
        every = spec.checkpoint_every
        between_groups = step % self.repeats == 0  # a resumed run samples its next group afresh, as this one will
        if self.hooks.checkpoints and (last or (between_groups and (eval_now or (every and step % every == 0)))):
            self._save(n_batches)
        if eval_now and self.hooks.guard:
            self.hooks.guard(self.result.evaluations[-1], step)  # after the save: the checkpoint is kept

    def _evaluate(self) -> dict:
        # Under DDP rank 0 evaluates alone on its replica; FSDP needs every rank in each forward. Either way
        # all ranks act on rank 0's figures, so they take the same early-stop and guardrail decisions.
        metrics = None
        if self.world.main or self.world.mode == "fsdp":
            metrics = self.wrapped.run(self._measure)
        metrics = distributed.from_main(metrics)
        self.model.train()
        self.result.evaluations.append({"step": self.step, **metrics})
        if self.hooks.log and self.world.main:
            self.hooks.log({f"val/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}, self.step)
        # the base model (step 0) is the reference, not a candidate
        best = self.step > 0 and self.selector.update(self.step, metrics)
        if best:
            self.result.best_step = self.step
        if self.world.main:
            self._print_evaluation(metrics, best)
        if self.step > 0 and not best and self.selector.should_stop:
            self.result.stopped_early = True
            event = (f"early stop at step {self.step}: {self.selector.metric} has not improved for "
                     f"{self.selector.bad_evals} evaluations (best {self.selector.best_value:.4f} at step "
                     f"{self.selector.best_step})")
            self.result.events.append({"step": self.step, "event": event})
            console.print(f"[yellow]{event}[/]")
        return metrics

    def _print_evaluation(self, metrics: dict, best: bool) -> None:
        """One line per evaluation, so the curve stays readable in the terminal and in a log file; the progress
        bar shows only the latest step's loss."""
        figures = self.hooks.describe(metrics) if self.hooks.describe else \
            ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, float))
        sel = self.selector
        band = f" within {sel.min_delta:g}" if sel.min_delta else ""
        where = "  (base model)" if self.step == 0 else "" if not best else \
            f"  (kept: {sel.metric} level with the best{band}, and a lower val_loss)" if sel.by_tie else \
            f"  (best so far by {sel.metric})"
        console.print(f"step {self.step}/{self.result.steps}: {figures or 'measured'}{where}", markup=False)

    def _measure(self, model) -> dict:
        metrics = self.hooks.evaluate(model, self.ctx, self.step) if self.hooks.evaluate else {}
        if self.held_out:
            metrics.update(self.objective.evaluate(model, self.held_out, self.ctx, self.spec.batch_size))
        return metrics

    def _referenced(self) -> list[Preference]:
        """The items whose reference log-probs a checkpoint stores: training items, then held-out ones."""
        return list(self.samples) + list(self.held_out) if self.objective.needs_reference else []

    def attach_references(self) -> None:
        """The reference log-probs of every preference item, from the model before its first step."""
        items = self._referenced()
        if not items:
            return
        began = time.perf_counter()

        def attach(model) -> None:
            model.eval()
            self.objective.attach_references(model, items, self.ctx, self.spec.batch_size)
            model.train()

        self.wrapped.run(attach)
        console.print(f"Reference log-probs of {len(items)} items (the starting model) in "
                      f"{time.perf_counter() - began:.0f} s")

    def _save(self, n_batches: int) -> None:
        epoch, position = (self.epoch + 1, 0) if self.position >= n_batches else (self.epoch, self.position)
        # Full tensors keyed by name (collectives under FSDP: every rank takes part), so any process count
        # can resume; each rank's RNG state, so the same count resumes exactly.
        params = distributed.full_tensors(self.strategy.checkpoint_params(self.model))
        optimizer = distributed.optimizer_state(self.model, self.optimizer)
        rngs = distributed.gather(rng_state())
        if not self.world.main:
            return
        trainer = {"optimizer": optimizer, "schedule": self.schedule.state_dict(), "rng": rngs[0]}
        if referenced := self._referenced():  # so a resumed run compares against the same reference
            trainer["references"] = torch.tensor([item.reference for item in referenced], dtype=torch.float64)
        if self.world.active:
            trainer["rng_ranks"] = rngs
        state = {"step": self.step, "epoch": epoch, "position": position, "selector": self.selector.state(),
                 "result": self.result.figures(), "processes": self.world.size}
        self.hooks.checkpoints.save(self.step, params, trainer, state, self.result.best_step)

    def restore(self, path: Path, trainer: dict, state: dict) -> None:
        """The optimizer, schedule, position and RNG of a checkpoint whose weights train() already loaded."""
        self.resumed = True
        distributed.load_optimizer_state(self.model, self.optimizer, trainer["optimizer"])
        self.schedule.load_state_dict(trainer["schedule"])
        if referenced := self._referenced():
            stored = trainer.get("references")
            if stored is None or stored.shape[0] != len(referenced):
                held = "none" if stored is None else f"{stored.shape[0]}"
                raise TailorError(f"{path}: the checkpoint holds reference log-probs for {held} items and this run "
                                  f"has {len(referenced)}; resume with the data the run started with")
            for item, values in zip(referenced, stored.tolist()):
                item.reference = values
        self.step, self.epoch, self.position = state["step"], state["epoch"], state["position"]
        self.selector = Selector.from_state(state["selector"])
        self.result = TrainResult(**state["result"])
        before = state.get("processes", 1)
        where = f" ({before} -> {self.world.size} processes)" if before != self.world.size else ""
        self.result.events.append({"step": self.step, "event": f"resumed from {path.name}{where}"})
        ranks = trainer.get("rng_ranks") or [trainer["rng"]]
        # last: nothing above may draw from the generators. Another process count cannot replay the old
        # per-rank streams (dropout differs); the data order and everything else still continue exactly.
        set_rng_state(ranks[self.world.rank] if len(ranks) == self.world.size else trainer["rng"])
        console.print(f"Resumed from {path} at step {self.step} of {self.result.steps}{where}")


def restore_best(model, strategy: Strategy, store: CheckpointStore | None, result: TrainResult) -> Path | None:
    """Put the best checkpoint's weights back when it is not the last step; returns its path."""
    if store is None or result.best_step is None or result.best_step == result.completed:
        return None
    best = store.best()
    if best is None:
        return None
    load_weights(best, strategy.checkpoint_params(model))
    return best
