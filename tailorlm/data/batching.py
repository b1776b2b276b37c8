"""Batches: length-grouped, seeded, and a pure function of (seed, epoch) so a run can be replayed exactly.

Grouping similar lengths keeps padding (wasted compute) low; the groups are then shuffled so the loss
does not see a length curriculum.
"""
from __future__ import annotations

import random

import torch

from tailorlm.data.samples import IGNORE, Sample

GROUP_BATCHES = 32  # sort lengths within windows of this many batches


def epoch_batches(samples: list[Sample], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Index batches for one epoch: shuffle, sort by length in windows, shuffle the batches."""
    rng = random.Random(seed * 1000003 + epoch)
    order = list(range(len(samples)))
    rng.shuffle(order)
    window = batch_size * GROUP_BATCHES
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: len(samples[i]))
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def eval_batches(samples: list[Sample], batch_size: int) -> list[list[int]]:
    """Length-sorted batches for evaluation (no gradient, order does not matter)."""
    order = sorted(range(len(samples)), key=lambda i: len(samples[i]))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def collate(samples: list[Sample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sample; padding carries no attention and no loss."""
    width = max(len(s) for s in samples)
    input_ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((len(samples), width), dtype=torch.long)
    for row, s in enumerate(samples):
        n = len(s)
        input_ids[row, :n] = torch.tensor(s.input_ids)
        labels[row, :n] = torch.tensor(s.labels)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
