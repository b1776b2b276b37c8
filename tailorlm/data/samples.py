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


@dataclass
class Preference:
    """One item of preference training (train/objectives.py), two tokenized sequences of the same prompt.

    A pair (dpo, orpo, simpo): the chosen answer and the rejected one. An unpaired answer (kto): the answer,
    good or bad as `desirable` says, and the same prompt with another example's answer, which estimates how
    far the model has drifted from the reference (KTO's KL term)."""
    chosen: Sample  # kto: the answer
    rejected: Sample  # kto: the mismatched answer
    desirable: bool | None = None  # kto only
    reference: list[float] | None = None  # the reference model's summed log-probs of both (set before training)

    def __len__(self) -> int:
        """The tokens a training step packs for this item (kto trains on its answer alone)."""
        return len(self.chosen) + (len(self.rejected) if self.desirable is None else 0)

    @property
    def example(self) -> dict:
        return self.chosen.example
