"""Optimizer and learning-rate schedule: AdamW, linear warmup, then cosine, linear or constant."""
from __future__ import annotations

import torch

from tailorlm.config import TrainSpec

# transformers' names for the schedules train.schedule offers
SCHEDULES = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}


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
    """Linear warmup over warmup_ratio of the steps, then cosine, linear or constant: transformers' schedule,
    one factor for every parameter group (each keeps its own lr as the base)."""
    # here, not at the top: its module loads the trainer utilities and peft, which only a training run needs
    from transformers import get_scheduler

    warmup = int(round(spec.warmup_ratio * total_steps))
    # transformers' warmup is step/warmup, so its first step runs at lr 0: a wasted step. Its schedule one step
    # longer, read one step ahead, starts at 1/(warmup+1), reaches the full lr as the warmup ends and decays
    # over the same steps. Built on a stand-in: only its factor is kept, and the real optimizer's lrs stay as set.
    stand_in = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    ahead = get_scheduler(SCHEDULES[spec.schedule], stand_in, num_warmup_steps=warmup + 1,
                          num_training_steps=total_steps + 1).lr_lambdas[0]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: ahead(step + 1))
