"""Optimizer and learning-rate schedule: AdamW, linear warmup, then cosine, linear or constant."""
from __future__ import annotations

import math

import torch

from tailorlm.config import TrainSpec


def make_optimizer(groups: list[dict], spec: TrainSpec) -> torch.optim.Optimizer:
    """AdamW over the strategy's parameter groups (each with its own lr), each split so that norms and
    biases get no weight decay."""
    split = []
    for group in groups:
        extra = {k: v for k, v in group.items() if k != "params"}
        decay = [p for p in group["params"] if p.ndim >= 2]
        no_decay = [p for p in group["params"] if p.ndim < 2]
        split += [{**extra, "params": decay, "weight_decay": spec.weight_decay},
                  {**extra, "params": no_decay, "weight_decay": 0.0}]
    params = [p for g in split for p in g["params"]]
    fused = bool(params) and params[0].is_cuda  # one kernel for the whole update on GPU
    return torch.optim.AdamW([g for g in split if g["params"]], betas=(0.9, 0.999), fused=fused or None)


def make_schedule(optimizer: torch.optim.Optimizer, spec: TrainSpec, total_steps: int):
    warmup = int(round(spec.warmup_ratio * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if spec.schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        if spec.schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
