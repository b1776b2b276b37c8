"""Retention: how much general skill the model keeps while it learns the task (catastrophic forgetting).

A fixed set of general instruction data (builtin:general by default, or the user's own) is scored by the
perplexity of its reference answers under the model's chat template, before training, at every evaluation
and after training. Perplexity of reference answers is cheap (one forward pass, no generation) and moves as
soon as the model starts overwriting what it knew; ROUGE-L on generated answers is available at the end.
The guardrail compares each measurement with the base model's and warns or stops past a set limit.
"""
from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass


from tailorlm.config import DataSpec, RetentionSpec, TemplateSpec
from tailorlm.data.dataset import to_examples
from tailorlm.data.sources import read_table
from tailorlm.data.samples import Sample
from tailorlm.data.templates import PromptTemplate
from tailorlm.data.tokenize import ChatFormat, encode_examples
from tailorlm.errors import DataError, TailorError
from tailorlm.tasks import TASKS
from tailorlm.ui import console

RETENTION_MAX_LENGTH = 384  # tokens per retention sample; longer answers are dropped, not truncated


@dataclass
class RetentionProbe:
    spec: RetentionSpec
    samples: list[Sample]
    source: str
    base_ppl: float | None = None  # the base model's perplexity, the guardrail's reference
    warned: bool = False  # the advice is printed once; later breaches get one short line

    @classmethod
    def load(cls, spec: RetentionSpec, tokenizer, template_spec: TemplateSpec, seed: int) -> "RetentionProbe | None":
        if not spec.data:
            return None
        table = read_table(spec.data)
        template = PromptTemplate(TemplateSpec(preset="instruction", system=template_spec.system,
                                               chat_template=template_spec.chat_template,
                                               max_length=RETENTION_MAX_LENGTH, overlong="drop"))
        examples = to_examples(table, DataSpec(train=spec.data), template.fields, None, TASKS["instruction"], Counter())
        rng = random.Random(seed)
        examples = rng.sample(examples, min(spec.limit, len(examples)))
        samples, _ = encode_examples(examples, template, ChatFormat(tokenizer, template.spec), [], template.spec)
        if not samples:
            raise DataError(table.path, None, f"eval.retention.data: no example fits {RETENTION_MAX_LENGTH} tokens")
        return cls(spec, samples, table.path)

    def perplexity(self, model, loss_fn) -> float:
        """exp(mean loss per answer token); loss_fn(model, samples) -> mean loss (the loop's validation loss)."""
        return math.exp(min(loss_fn(model, self.samples), 50.0))

    def measure(self, model, loss_fn) -> dict:
        ppl = self.perplexity(model, loss_fn)
        if self.base_ppl is None:
            self.base_ppl = ppl
        return {"retention_ppl": ppl, "retention_change": ppl / self.base_ppl - 1.0}

    def guard(self, metrics: dict, step: int) -> None:
        """Warn or stop (spec.action) when retention perplexity rose more than spec.max_increase."""
        change = metrics.get("retention_change")
        if change is None or change <= self.spec.max_increase or self.spec.action == "ignore":
            return
        message = (f"retention guardrail: at step {step} the perplexity of general data ({self.source}) is "
                   f"{metrics['retention_ppl']:.2f}, {change:+.0%} over the base model's {self.base_ppl:.2f} "
                   f"(limit +{self.spec.max_increase:.0%}); the model is forgetting general skills. Lower train.lr, "
                   f"train fewer steps, or change fewer weights (LoRA, a smaller method.lora.r, freezing)")
        if self.spec.action == "error":
            raise TailorError(message + "; the checkpoint of this step is kept")
        if self.warned:
            message = f"retention guardrail: at step {step} still {change:+.0%} over the base model"
        self.warned = True
        console.print(f"[yellow]warning: {message}[/]")
