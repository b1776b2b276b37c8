"""The one training loop. Methods (full, LoRA, ...) are strategies that only decide which parameters train.

Loss normalisation is exact under gradient accumulation: each optimizer step divides the summed token
losses of all its micro-batches by their total number of completion tokens, so accumulating 4 batches of 2
gives the same update as one batch of 8.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from tailorlm.config import TrainSpec
from tailorlm.data.batching import epoch_batches
from tailorlm.data.tokenize import Sample
from tailorlm.errors import TailorError
from tailorlm.models.methods import Strategy
from tailorlm.train.optim import make_optimizer, make_schedule
from tailorlm.train.step import (
    StepContext,
    accumulate_gradients,
    fast_training,
    validation_loss,
)
from tailorlm.ui import console, progress


@dataclass
class TrainResult:
    steps: int
    train_loss: list[dict] = field(default_factory=list)  # {step, epoch, loss, lr}
    val_loss: list[dict] = field(default_factory=list)  # {step, loss}
    seconds: float = 0.0
    tokens: int = 0  # real (non-padding) tokens seen


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def plan_steps(n_samples: int, spec: TrainSpec) -> tuple[int, int]:
    """(optimizer steps per epoch, total optimizer steps)."""
    per_epoch = math.ceil(math.ceil(n_samples / spec.batch_size) / spec.grad_accum)
    return per_epoch, spec.max_steps or per_epoch * spec.epochs


def train(model, strategy: Strategy, train_samples: list[Sample], val_samples: list[Sample], spec: TrainSpec,
          lr: float, pad_id: int, device: torch.device) -> TrainResult:
    seed_everything(spec.seed)
    with fast_training(model, spec, pad_id, device) as ctx:
        return _train(model, strategy, train_samples, val_samples, spec, lr, ctx)


def _train(model, strategy: Strategy, train_samples: list[Sample], val_samples: list[Sample], spec: TrainSpec,
           lr: float, ctx: StepContext) -> TrainResult:
    params = strategy.trainable(model)
    if not params:
        raise TailorError("the method left no trainable parameters")
    optimizer = make_optimizer(params, spec, lr)
    _, total_steps = plan_steps(len(train_samples), spec)
    schedule = make_schedule(optimizer, spec, total_steps)
    result = TrainResult(steps=total_steps)
    n_trainable = sum(p.numel() for p in params)
    n_total = sum(p.numel() for p in model.parameters())
    console.print(f"Training {n_trainable:,} of {n_total:,} parameters ({n_trainable / n_total:.2%}) for {total_steps} "
                  f"steps: {len(train_samples)} samples, batch {spec.batch_size} x {spec.grad_accum} accumulation, lr {lr:g}")

    def validate(at_step: int) -> float:
        loss = validation_loss(model, val_samples, spec.batch_size, ctx)
        result.val_loss.append({"step": at_step, "loss": loss})
        return loss

    if val_samples and spec.eval_every:  # the starting point: how the base model does on the validation split
        validate(0)
    model.train()
    step, epoch, start = 0, 0, time.perf_counter()
    with progress("train", total_steps) as advance:
        while step < total_steps:
            batches = epoch_batches(train_samples, spec.batch_size, spec.seed, epoch)
            for first in range(0, len(batches), spec.grad_accum):
                if step >= total_steps:
                    break
                group = [[train_samples[i] for i in idx] for idx in batches[first:first + spec.grad_accum]]
                loss = train_step(model, strategy, optimizer, group, spec, ctx, step, result)
                schedule.step()
                step += 1
                result.train_loss.append({"step": step, "epoch": round(epoch + (first + 1) / len(batches), 3),
                                          "loss": loss, "lr": schedule.get_last_lr()[0]})
                info = f"loss {loss:.3f}"
                if spec.eval_every and step % spec.eval_every == 0 and step < total_steps and val_samples:
                    info += f" val {validate(step):.3f}"
                advance(1, info)
            epoch += 1
    if val_samples:
        validate(step)
    result.seconds = time.perf_counter() - start
    model.eval()
    return result


def train_step(model, strategy: Strategy, optimizer, group: list[list[Sample]], spec: TrainSpec, ctx: StepContext,
               step: int, result: TrainResult) -> float:
    """One optimizer step over a group of micro-batches; returns the mean loss per completion token."""
    strategy.on_step(step, model)
    loss, tokens = accumulate_gradients(model, group, ctx)
    result.tokens += tokens
    if not math.isfinite(loss):
        raise TailorError(f"the training loss became {loss} at step {step + 1}; lower train.lr or check the data")
    if spec.max_grad_norm:
        torch.nn.utils.clip_grad_norm_(strategy.trainable(model), spec.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss
