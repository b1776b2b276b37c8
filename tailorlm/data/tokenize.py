"""Prompt/completion text -> token ids with an exact loss mask, under the model's own chat template.

The prompt and the completion are tokenized separately and concatenated. That is exactly what happens at
inference (the model is fed the prompt ids and generates the rest), so the mask boundary is exact and the
training prompt equals the generation prompt token for token.

ChatFormat is defined in conversations.py (which this module builds on) and is imported from here as well.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from tailorlm.config import TemplateSpec
from tailorlm.data.conversations import ChatFormat, encode_conversation, loss_turns
from tailorlm.data.preferences import IDENTICAL, encode_preferences
from tailorlm.data.samples import IGNORE, Preference, Sample
from tailorlm.data.templates import PromptTemplate
from tailorlm.errors import DataError, TailorError


@dataclass
class EncodeReport:
    total: int = 0
    kept: int = 0
    truncated: int = 0
    dropped: Counter = field(default_factory=Counter)

    def summary(self) -> str:
        drops = ", ".join(f"{n} {why}" for why, n in self.dropped.items()) or "none"
        return f"{self.kept}/{self.total} kept, {self.truncated} truncated to fit, dropped: {drops}"


def encode_examples(examples, template: PromptTemplate, fmt: ChatFormat, labels: list[str],
                    spec: TemplateSpec, train_on: str | None = None) -> tuple[list[Sample], EncodeReport]:
    """Encode examples for training; over-long ones follow spec.overlong, and every action is counted.
    train_on: for conversations, which replies carry loss (spec.train_on when None; held-out splits pass
    last_assistant, the reply they are scored on)."""
    examples = [ex for ex in examples if ex.get("_desirable") is not False]  # a bad kto answer is no reference
    report, samples = EncodeReport(total=len(examples)), []
    for ex in examples:
        if template.task.conversational:
            sample, truncated = _encode_conversation(ex, template, fmt, spec, train_on or spec.train_on)
        else:
            sample, truncated = _encode_one(ex, template, fmt, labels, spec)
        if sample is None:
            report.dropped[f"longer than max_length={spec.max_length}"] += 1
            continue
        report.truncated += truncated
        report.kept += 1
        samples.append(sample)
    return samples, report


def _encode_one(ex: dict, template: PromptTemplate, fmt: ChatFormat, labels, spec: TemplateSpec,
                completion: str | None = None):
    """completion: the answer to train on instead of the template's (a preference pair's chosen or rejected)."""
    answer = template.completion(ex) if completion is None else completion
    completion_ids = fmt.encode_completion(fmt.completion_text(template.prompt(ex, labels), answer))
    field_text = ex.get(template.truncate_field) if template.truncate_field else None
    field_ids = fmt.tokenizer(field_text, add_special_tokens=False)["input_ids"] if isinstance(field_text, str) else []
    keep, current = len(field_ids), ex
    for _ in range(8):  # re-tokenizing a shortened field can shift a token or two; converge in a few rounds
        prompt_ids = fmt.encode_prompt(fmt.prompt_text(template.prompt(current, labels)))
        excess = len(prompt_ids) + len(completion_ids) - spec.max_length
        if excess <= 0:
            sample = Sample(prompt_ids + completion_ids, [IGNORE] * len(prompt_ids) + completion_ids, current)
            return sample, current is not ex
        if spec.overlong == "drop" or not field_ids:
            return None, False
        keep -= excess if current is not ex else excess + 2  # room for the " ..." marker
        if keep <= 0:
            return None, False
        current = {**ex, template.truncate_field: fmt.tokenizer.decode(field_ids[:keep]).rstrip() + " ..."}
    return None, False


def _encode_conversation(ex: dict, template: PromptTemplate, fmt: ChatFormat, spec: TemplateSpec, train_on: str):
    """A conversation under the chat template (data/conversations.py); a long one ends at its last reply that
    fits (truncated), or is dropped under overlong=drop. The example is re-derived for the messages kept."""
    messages = ex["messages"]
    if spec.system and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": spec.system}] + messages
    weighted = loss_turns(messages)  # the replies that may carry loss (weight 0 never does)
    if train_on == "last_assistant" and weighted:  # held out: scored on the last reply that may carry loss
        messages = messages[:weighted[-1] + 1]
    try:
        sample = encode_conversation(fmt, messages, train_on, ex.get("tools") or None, spec.max_length)
    except TailorError as e:
        raise DataError(ex.get("_where", "data"), None, str(e)) from None
    if sample is None:
        return None, False
    kept = sample.example["messages"]
    truncated = len(kept) < loss_turns(messages, train_on)[-1] + 1  # a reply that would carry loss was cut
    if truncated and spec.overlong == "drop":
        return None, False
    example = {**ex, "messages": kept, **template.task.derive({"messages": kept})}
    return Sample(sample.input_ids, sample.labels, example), truncated


def encode_preference_examples(examples, template: PromptTemplate, fmt: ChatFormat, labels: list[str],
                               spec: TemplateSpec, seed: int) -> tuple[list[Preference], EncodeReport]:
    """The examples that carry answers to compare, as Preference items (data/preferences.py). Each answer is
    encoded as the completion of the same prompt, with SFT's mask; a conversation is scored on its last reply,
    so one whose last reply does not fit is dropped, never trained on an earlier one."""
    def encode(ex: dict, completion: str) -> Sample | None:
        return _encode_one(ex, template, fmt, labels, spec, completion)[0]

    def encode_messages(ex: dict, messages: list[dict]) -> Sample | None:
        sample, truncated = _encode_conversation({**ex, "messages": messages}, template, fmt, spec, "last_assistant")
        return None if truncated else sample

    items, dropped, identical = encode_preferences(examples, encode, encode_messages, seed, spec.max_length)
    report = EncodeReport(total=len(items) + dropped + identical, kept=len(items))
    if dropped:
        report.dropped[f"longer than max_length={spec.max_length}"] = dropped
    if identical:
        report.dropped[IDENTICAL] = identical
    return items, report
