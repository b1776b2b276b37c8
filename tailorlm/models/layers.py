"""Where each parameter sits in the stack: embeddings, decoder block i, or the top (final norm, head).

Freezing and gradual unfreezing work on this view, so they apply to any transformers causal LM whose
blocks live in one ModuleList (Llama, Gemma, Qwen, GPT-2's `h`, ...), not just one architecture.
"""
from __future__ import annotations

import re

import torch

from tailorlm.data.model_shape import BOTTOM, TOP, unfreeze_group


def block_list_name(model: torch.nn.Module) -> tuple[str, int]:
    """(qualified name of the decoder-block ModuleList, number of blocks): the longest ModuleList."""
    best, size = "", 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > size:
            best, size = name, len(module)
    if not size:
        raise ValueError("the model has no list of decoder blocks to freeze or unfreeze")
    return best, size


def parameter_depths(model: torch.nn.Module) -> dict[str, int]:
    """Parameter name -> block index; BOTTOM for embeddings, TOP for everything after the last block.

    Tied weights appear once (named_parameters de-duplicates), under their first name: a tied head is the
    input embedding, so it sits at BOTTOM and trains or freezes with the embeddings."""
    blocks, _ = block_list_name(model)
    pattern = re.compile(re.escape(blocks) + r"\.(\d+)\.")
    depths = {}
    for name, _ in model.named_parameters():
        match = pattern.search(name)
        if match:
            depths[name] = int(match.group(1))
        else:
            depths[name] = BOTTOM if "embed" in name or "wte" in name or "wpe" in name else TOP
    return depths


def top_down_groups(model: torch.nn.Module, n_groups: int) -> list[list[str]]:
    """Parameter names in n_groups layer groups, group 0 at the top (head, final norm, last blocks) and the
    last group at the bottom (first blocks, embeddings). Blocks are split as evenly as possible."""
    depths = parameter_depths(model)
    _, n_blocks = block_list_name(model)
    n_groups = max(1, min(n_groups, n_blocks + 1))
    groups: list[list[str]] = [[] for _ in range(n_groups)]
    for name, depth in depths.items():
        groups[unfreeze_group(depth, n_blocks, n_groups)].append(name)
    return [g for g in groups if g]


def describe_group(names: list[str], depths: dict[str, int]) -> str:
    """'blocks 20-29, norm/head' style label of a group, for logs."""
    levels = {depths[n] for n in names}
    blocks = sorted(d for d in levels if 0 <= d < TOP)
    parts = [f"blocks {blocks[0]}-{blocks[-1]}" if len(blocks) > 1 else f"block {blocks[0]}"] if blocks else []
    if TOP in levels:
        parts.append("norm/head")
    if BOTTOM in levels:
        parts.append("embeddings")
    return ", ".join(parts)
