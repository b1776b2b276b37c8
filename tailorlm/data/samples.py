"""A tokenized training sample and the label value that carries no loss: the types every layer passes around.

Tokenization (data/tokenize.py) makes samples; batching, the kernels (packing, the completion-only loss),
training and evaluation consume them. This module imports nothing from tailorlm, so any of those layers can
depend on it without pulling in tokenization, templates or config: the kernels in particular sit above data
only for these two names. tests/test_layers.py checks that it stays a leaf.
"""
from __future__ import annotations

from dataclasses import dataclass

IGNORE = -100  # label value that carries no loss (PyTorch's cross_entropy ignore_index)


@dataclass
class Sample:
    input_ids: list[int]
    labels: list[int]  # IGNORE on prompt tokens, the token id on completion tokens
    example: dict  # the example as encoded (its input field shortened if it had to be)

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def prompt_ids(self) -> list[int]:
        """The tokens before the first one that carries loss (a conversation's later turns are not prompt)."""
        first = next((i for i, label in enumerate(self.labels) if label != IGNORE), len(self.labels))
        return self.input_ids[:first]
