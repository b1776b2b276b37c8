"""A GGUF model's dequantized weights and its tokenizer, kept between loads of one process while a search runs.

`tailor auto` trains many short trials of the same few models in one process. For a GGUF file, every load
parses the file's metadata (the tokenizer's vocabulary string by string) and dequantizes every tensor: 3 s for
SmolLM2-135M, 12 to 14 s for Gemma-3-270M on a 2-core CPU, beside trials of 30 to 60 s. Inside
`keeping()`, the first load of an unchanged file keeps a copy of the base weights (before any adapter of a
run is merged) and of its tokenizer; later loads build the model from a fresh copy, so a trial that trains the
weights in place (full fine-tuning) never changes what the next one starts from.

Off outside `keeping()`: a long-lived process (the studio, a server) would otherwise hold a model's weights it
may never load again. Only GGUF files are kept: a safetensors folder is memory-mapped and loads in a second.
"""
from __future__ import annotations

import contextlib
import copy
import threading

import torch

_lock = threading.Lock()
_depth = 0  # open keeping() contexts; the store is emptied when the last one closes
_weights: dict[tuple, tuple[type, dict[str, torch.Tensor]]] = {}  # (file identity, dtype) -> (model class, state)
_tokenizers: dict[tuple, object] = {}  # file identity -> its tokenizer


@contextlib.contextmanager
def keeping():
    """While inside, GGUF loads keep their weights and tokenizer for the next load of the same file."""
    global _depth
    with _lock:
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                _weights.clear()
                _tokenizers.clear()


def active() -> bool:
    return _depth > 0


def weights(key: tuple) -> tuple[type, dict[str, torch.Tensor]] | None:
    """(the model's class, a copy of its kept weights, which the caller's model then owns) for `key`, or None."""
    kept = _weights.get(key)
    return None if kept is None else (kept[0], _copy(kept[1]))


def keep_weights(key: tuple, model: torch.nn.Module) -> None:
    if active():
        _weights[key] = type(model), _copy(model.state_dict())


def _copy(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A copy of a state dict in which names sharing one tensor still share one: a tied head and embedding
    (Gemma-3-270M's, 168M of its 268M parameters) is copied once, not twice."""
    copies: dict[tuple, torch.Tensor] = {}
    out = {}
    for name, tensor in state.items():
        same = (tensor.data_ptr(), tensor.shape, tensor.stride(), tensor.dtype)  # one tensor, not two views
        if same not in copies:
            copies[same] = tensor.detach().clone()
        out[name] = copies[same]
    return out


def tokenizer(key: tuple):
    kept = _tokenizers.get(key)
    return None if kept is None else copy.deepcopy(kept)


def keep_tokenizer(key: tuple, loaded) -> None:
    if active():
        _tokenizers[key] = copy.deepcopy(loaded)
