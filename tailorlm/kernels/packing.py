"""Packed batches: a batch's samples laid end to end in one row, with no padding.

Padding a batch to its longest sample wastes the compute of every pad token; with instruction-like lengths
(long tail) that is often half of the batch. Packing concatenates the samples instead. Three things keep
the result identical to running each sample alone:
- positions restart at 0 for every sample (RoPE sees the same positions);
- attention never crosses a sample boundary (see kernels/attention.py, which reads `cu_seqlens`);
- the loss never asks one sample's last token to predict the next sample's first token (that label is IGNORE).
"""
from __future__ import annotations

import torch

from tailorlm.data.samples import IGNORE, Sample


def pack(samples: list[Sample], pad_to_multiple: int = 1, pad_id: int = 0) -> dict:
    """One row holding all samples: input_ids, labels, position_ids (1 x T), cu_seqlens (n+1,), max_len.

    pad_to_multiple > 1 appends a filler segment (no loss, attends only to itself) so that T takes few
    distinct values, which keeps compiled kernels from recompiling for every new length."""
    ids, labels, positions, bounds = [], [], [], [0]
    for s in samples:
        ids += s.input_ids
        labels += [IGNORE] + list(s.labels[1:])  # the first token is never predicted from the previous sample
        positions += range(len(s))
        bounds.append(bounds[-1] + len(s))
    filler = -len(ids) % pad_to_multiple
    if filler:
        ids += [pad_id] * filler
        labels += [IGNORE] * filler
        positions += range(filler)
        bounds.append(bounds[-1] + filler)
    longest = max(b - a for a, b in zip(bounds, bounds[1:]))
    return {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]),
            "position_ids": torch.tensor([positions]), "cu_seqlens": torch.tensor(bounds, dtype=torch.int32),
            "max_len": bucket(longest), "real_tokens": bounds[-1] - filler}


def bucket(longest: int) -> int:
    """An upper bound on the longest sample, rounded up to a power of two (at least 128).

    FlashAttention only sizes its grid with it, so any bound is correct; compiled code specialises on this
    integer, and a new value every step would recompile every step."""
    return max(128, 1 << (longest - 1).bit_length())


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
