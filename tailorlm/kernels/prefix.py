"""Shared-prefix computation: run the tokens that every row of a batch starts with only once.

Prompts rendered from one template open with the same tokens: the system prompt, the instruction, the
label list and, for few-shot prompting, every demonstration. On the default job that is about half of each
sample. We run the shared prefix once (batch 1), repeat its key/value cache across the batch, and run only
the rows' own suffixes on top. Positions and attention are the same as for the full rows, so the result is
the same computation up to float rounding, and gradients flow back into the prefix through the cache.
"""
from __future__ import annotations

import torch

from tailorlm.kernels.fallback import say_once

MIN_PREFIX = 8  # below this the extra prefix pass costs more than it saves


def shared_prefix_len(rows: list[list[int]], limit: int) -> int:
    """Length of the longest prefix common to all rows, at most `limit`; 0 when not worth sharing."""
    if len(rows) < 2:
        return 0
    first = rows[0]
    n = min(limit, *(len(r) for r in rows))
    for row in rows[1:]:
        i = 0
        while i < n and row[i] == first[i]:
            i += 1
        n = i
    return n if n >= MIN_PREFIX else 0


def shared_prefix_len_padded(input_ids_BxT: torch.Tensor, limit: int) -> int:
    """shared_prefix_len for a right-padded batch tensor (the training path)."""
    if input_ids_BxT.shape[0] < 2:
        return 0
    same_T = (input_ids_BxT == input_ids_BxT[:1]).all(0).long().cumprod(0)
    n = min(int(same_T.sum()), limit)
    return n if n >= MIN_PREFIX else 0


def prefix_cache(decoder, prefix_ids: torch.Tensor, batch_size: int):
    """The key/value cache of a 1-D prefix, repeated for batch_size rows (differentiable)."""
    cache = decoder(input_ids=prefix_ids[None], use_cache=True).past_key_values
    cache.batch_repeat_interleave(batch_size)
    return cache


def suffix_hidden(decoder, input_ids_BxT: torch.Tensor, attention_mask_BxT: torch.Tensor, prefix_len: int) -> torch.Tensor:
    """Last hidden states of positions prefix_len.. of right-padded rows that all start with the same prefix."""
    batch, width = input_ids_BxT.shape
    cache = prefix_cache(decoder, input_ids_BxT[0, :prefix_len], batch)
    positions_BxS = torch.arange(prefix_len, width, device=input_ids_BxT.device).expand(batch, -1)
    out = decoder(input_ids=input_ids_BxT[:, prefix_len:], attention_mask=attention_mask_BxT,
                  past_key_values=cache, position_ids=positions_BxS, use_cache=True)
    return out.last_hidden_state


def window_shorter_than(model, longest: int) -> int | None:
    """The model's sliding window when it applies and is shorter than `longest` tokens, else None (Qwen2
    configs carry a window that only use_sliding_window turns on)."""
    config = getattr(model, "config", None)
    window = getattr(config, "sliding_window", None)
    uses_window = window and (config.model_type != "qwen2" or getattr(config, "use_sliding_window", False))
    return window if uses_window and longest > window else None


def generation_prefix_blocker(model, longest: int) -> str | None:
    """Why generation cannot share a prefix with this model for rows up to `longest` tokens (prompt and
    generated), or None.

    Generation lays rows out as [shared prefix | left padding | own tokens]. A sliding window counts cache
    slots, padding included, so a padded row would see less of its prefix than the same prompt alone does;
    a window longer than every row makes that harmless."""
    window = window_shorter_than(model, longest)
    if window is None:
        return None
    config = model.config
    reason = (f"{config.model_type}: sliding-window attention (window {window}) shorter than the rows; "
              f"generation runs each prompt whole, without a shared prefix")
    say_once(reason)
    return reason
