"""Multi-task mixing: how many training samples each task contributes to the combined training set.

- proportional: every sample once (large tasks dominate).
- weights: shares set by the config's task weights.
- temperature: shares proportional to size^(1/T) (T5's recipe); T=1 is proportional, large T tends to equal
  shares, so small tasks are not drowned without being repeated as often as with equal weights.
The combined set has as many samples as all tasks together; a task whose share exceeds its size is
repeated (whole copies, then a seeded sample), one below its size is subsampled.
"""
from __future__ import annotations

import random


def mixing_shares(sizes: list[int], weights: list[float], strategy: str, temperature: float) -> list[float]:
    if strategy == "proportional":
        raw = [float(n) for n in sizes]
    elif strategy == "weights":
        raw = list(weights)
    else:
        raw = [n ** (1.0 / temperature) for n in sizes]
    total = sum(raw)
    return [r / total for r in raw]


def mix(train_sets: list[list], shares: list[float], seed: int) -> list:
    """The combined training list; counts follow shares by largest remainders (they sum to the total).
    One task mixes to itself, in its own order (the loop shuffles each epoch)."""
    if len(train_sets) == 1:
        return list(train_sets[0])
    total = sum(len(s) for s in train_sets)
    quotas = [share * total for share in shares]
    counts = [int(q) for q in quotas]
    for i in sorted(range(len(quotas)), key=lambda i: quotas[i] - counts[i], reverse=True)[: total - sum(counts)]:
        counts[i] += 1
    rng = random.Random(seed + 11)
    mixed = []
    for samples, count in zip(train_sets, counts):
        copies, rest = divmod(count, len(samples))
        mixed += samples * copies + rng.sample(samples, rest)
    rng.shuffle(mixed)
    return mixed
