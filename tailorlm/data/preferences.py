"""Preference records (pairs for dpo, orpo, simpo; unpaired good/bad answers for kto): read as task examples
that carry the answers to compare, then tokenized into Preference items with the exact loss mask of SFT.

A preference example is the task's own example (the fields its template renders into the prompt, and its
reference answer for scoring) plus '_chosen' and '_rejected', the two completions ('_desirable' for kto).
Records may come as:
- TRL: prompt, chosen, rejected as strings, or as message lists (without a prompt, the turns chosen and
  rejected share are the prompt);
- LLaMA-Factory: instruction, input, chosen, rejected;
- a task's own fields plus chosen and rejected (what `tailor pairs` writes);
- KTO: prompt (or the task's fields), completion, and label true/false (or LLaMA-Factory's kto_tag).
A pair whose two answers are the same text is left out of training (encode_preferences says why), and a split
of nothing else is refused; preflight reports both, and pairs that nearly match.
"""
from __future__ import annotations

import json
import random
from typing import Any

from tailorlm.data.samples import IGNORE, Preference, Sample
from tailorlm.errors import DataError

EXTRA_KEYS = ("_chosen", "_rejected", "_desirable")  # what a preference example carries beyond task fields
IDENTICAL = "pairs with identical chosen and rejected answers"  # the reason such pairs are counted as dropped


def is_preference(fields: dict[str, Any], unpaired: bool) -> bool:
    """Whether a record is meant as a preference record. For kto the keys decide, not the label's value: a
    label of "yes" or 1 is a preference record with a bad label (preference_fields says so), not a task row."""
    if unpaired:
        return "completion" in fields and ("kto_tag" in fields or "label" in fields)
    return "chosen" in fields and "rejected" in fields


def preference_fields(fields: dict[str, Any], path: str, where: str, conversational: bool, unpaired: bool) -> dict:
    """A preference record's fields as task fields ('instruction'/'output', or 'messages' for the chat preset)
    plus the EXTRA_KEYS; the record's other columns are kept for the task's template."""
    out = {k: v for k, v in fields.items() if k not in ("prompt", "chosen", "rejected", "completion", "kto_tag")}
    if unpaired:
        key = "kto_tag" if "kto_tag" in fields else "label"
        tag = fields[key]
        if not isinstance(tag, bool):  # "yes", 1 or "true" would be a guess at what the file means
            raise DataError(path, where, f"'{key}' must be true or false (JSON booleans), not {_json(tag)}")
        if "kto_tag" not in fields:  # the label column is the answer's desirability, not a task field
            out.pop("label", None)
        answers = {"_chosen": fields["completion"]}
        out["_desirable"] = tag
    else:
        answers = {"_chosen": fields["chosen"], "_rejected": fields["rejected"]}
    names = {"_chosen": "completion" if unpaired else "chosen", "_rejected": "rejected"}
    prompt = fields.get("prompt")
    if isinstance(prompt, list):
        _check_turns(prompt, "prompt", path, where)
    for key, value in answers.items():
        if isinstance(value, list):
            _check_turns(value, names[key], path, where)
    lists = [isinstance(v, list) for v in answers.values()]
    if any(lists):
        if not all(lists):
            raise DataError(path, where, "chosen and rejected must both be text or both be message lists")
        prompt, answers = _split_conversations(prompt, answers, path, where)
    for key, value in answers.items():
        if not isinstance(value, (str, list)):
            raise DataError(path, where, f"'{names[key]}' must be text or a list of messages, got {type(value).__name__}")
        if isinstance(value, str) and not value.strip():
            raise DataError(path, where, f"empty '{names[key]}' answer")
    if conversational:
        if prompt is not None:
            turns = prompt if isinstance(prompt, list) else [{"role": "user", "content": _text(prompt, path, where)}]
            chosen = answers["_chosen"]
            out["messages"] = turns + (chosen if isinstance(chosen, list) else [{"role": "assistant", "content": chosen}])
        return {**out, **answers}
    if isinstance(prompt, list):  # one user turn (after an optional system turn) is an instruction
        system = [m.get("content", "") for m in prompt if m.get("role") == "system"]
        rest = [m for m in prompt if m.get("role") != "system"]
        if len(rest) != 1 or rest[0].get("role") != "user":
            raise DataError(path, where, f"a prompt of {len(rest)} turns besides the system's; the "
                                         f"{'instruction'} preset takes one user turn (template.preset=chat takes "
                                         f"conversations)")
        prompt = rest[0].get("content")
        out.setdefault("input", "\n".join(system))
    if prompt is not None:  # TRL's prompt is the whole instruction; Alpaca-style templates also read an input
        out.setdefault("instruction", _text(prompt, path, where))
        out.setdefault("input", "")
    answers = {k: _reply_text(v, path, where) for k, v in answers.items()}
    for key, value in answers.items():
        if not value.strip():
            raise DataError(path, where, f"empty '{names[key]}' answer")
    out.setdefault("output", answers["_chosen"])  # the reference answer generated text is scored against
    return {**out, **answers}


def _json(value) -> str:
    """A value as the data file spells it ("yes", 1, null), cut to a readable length."""
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):  # a Parquet or Python value JSON cannot hold
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_turns(turns: list, name: str, path, where) -> None:
    """Message lists of a preference record: objects with a role and text content."""
    for i, turn in enumerate(turns, start=1):
        if not isinstance(turn, dict) or not isinstance(turn.get("role"), str) or not isinstance(turn.get("content"), str):
            raise DataError(path, where, f"'{name}' turn {i}: expected an object with a 'role' and text 'content', "
                                         f"got {turn!r:.80}")


def _text(value, path, where) -> str:
    if not isinstance(value, str) or not value.strip():
        raise DataError(path, where, f"'prompt' must be non-empty text or a list of messages, got {value!r:.60}")
    return value


def _reply_text(value, path, where) -> str:
    """An answer as text: a string, or a list holding one assistant message."""
    if isinstance(value, str):
        return value
    if len(value) != 1 or not isinstance(value[0], dict) or value[0].get("role") != "assistant":
        raise DataError(path, where, "an answer given as messages must be one assistant message here "
                                     "(template.preset=chat takes longer ones)")
    return value[0]["content"]


def _split_conversations(prompt, answers: dict, path, where):
    """TRL's conversational records: with an explicit prompt the answers are the replies after it; without, the
    turns every answer shares are the prompt and the rest are the replies."""
    if prompt is None:
        lists = list(answers.values())
        shared = 0
        while all(shared < len(a) for a in lists) and all(a[shared] == lists[0][shared] for a in lists):
            shared += 1
        if shared == 0:
            raise DataError(path, where, "chosen and rejected share no opening turns and there is no 'prompt'")
        prompt, answers = lists[0][:shared], {k: v[shared:] for k, v in answers.items()}
    elif not isinstance(prompt, list):
        prompt = [{"role": "user", "content": _text(prompt, path, where)}]
    for key, value in answers.items():
        if not value or any(not isinstance(m, dict) or m.get("role") != "assistant" for m in value):
            raise DataError(path, where, f"'{key[1:]}' must continue the prompt with assistant turns only")
    return prompt, answers


def identical_answers(example: dict) -> bool:
    """Whether a pair's chosen and rejected answers are the same once runs of whitespace are collapsed."""
    return "_rejected" in example and _squeezed(example["_chosen"]) == _squeezed(example["_rejected"])


def answer_text(answer: str | list) -> str:
    """An answer as one text (the contents of a reply's turns, joined), to measure how much two answers differ."""
    return answer if isinstance(answer, str) else "\n".join(str(m.get("content") or "") for m in answer)


def _squeezed(answer: str | list):
    if isinstance(answer, str):
        return " ".join(answer.split())
    return [(m.get("role"), " ".join(str(m.get("content") or "").split()),
             json.dumps(m.get("tool_calls"), sort_keys=True, default=str)) for m in answer]


def check_not_all_identical(examples: list[dict]) -> None:
    """A split whose every pair has identical answers is refused, naming its file and a few lines: there is
    no preference in it to learn, and training would run at a constant loss (ln 2 for dpo) to no end."""
    pairs = [ex for ex in examples if "_rejected" in ex]
    if not pairs or not all(identical_answers(ex) for ex in pairs):
        return
    file = pairs[0].get("_where", "data").rsplit(", ", 1)[0]
    places = [ex.get("_where", "").rsplit(", ", 1)[-1] for ex in pairs]  # 'line 12', 'DataFrame row 3'
    # the first in the file, not in the split's shuffled order ('line 9' before 'line 10')
    lines = ", ".join(sorted(places, key=lambda p: (p.rstrip("0123456789"), len(p), p))[:3])
    which = "the one pair has" if len(pairs) == 1 else f"all {len(pairs)} pairs have"
    raise DataError(file, None, f"{which} the same chosen and rejected answer (once whitespace is collapsed; "
                                f"e.g. {lines}), so there is no preference to learn; give each pair a rejected "
                                f"answer that differs from its chosen one")


def encode_preferences(examples: list[dict], encode, encode_messages, seed: int,
                       max_length: int) -> tuple[list[Preference], int, int]:
    """Preference items of the examples that carry answers to compare, how many were dropped as too long, and
    how many pairs were left out because their answers are identical (identical_answers).

    encode(example, completion_text) -> Sample | None tokenizes a task example with that answer as its completion;
    encode_messages(example, messages) -> Sample | None a conversation scored on its last reply (tokenize.py)."""
    check_not_all_identical(examples)
    items, dropped, identical, unpaired = [], 0, 0, []
    for ex in examples:
        if "_chosen" not in ex:
            continue
        if identical_answers(ex):
            # Both sides are then one token sequence, so the dpo, ipo and simpo losses depend only on the
            # difference of two equal log-probs: the pair's gradient is exactly zero (its loss a constant, ln 2
            # for dpo) and keeping it would only shrink the step's mean over pairs and cost compute. Under orpo
            # or sft_weight its chosen answer would still be trained as SFT, but the record calls that very
            # answer rejected too, so it is no answer to teach. (Answers that differ only in whitespace differ
            # by a spacing token or two: no preference worth learning either.) Preflight reports the count.
            identical += 1
            continue
        sides = [ex["_chosen"]] + ([ex["_rejected"]] if "_rejected" in ex else [])
        if isinstance(sides[0], list) or "messages" in ex:
            prompt = ex["messages"][:len(ex["messages"]) - (len(sides[0]) if isinstance(sides[0], list) else 1)]
            replies = [s if isinstance(s, list) else [{"role": "assistant", "content": s}] for s in sides]
            samples = [encode_messages(ex, prompt + r) for r in replies]
        else:
            samples = [encode(ex, s) for s in sides]
        if any(s is None for s in samples):
            dropped += 1
            continue
        if len(samples) == 2:
            items.append(Preference(samples[0], samples[1]))
        else:
            unpaired.append((samples[0], ex["_desirable"]))
    return items + _with_mismatched(unpaired, seed, max_length), dropped, identical


def _with_mismatched(answers: list[tuple[Sample, bool]], seed: int, max_length: int) -> list[Preference]:
    """KTO items: each answer with its prompt followed by another example's answer (a seeded derangement), which
    estimates the KL term; fixed once, so its reference log-probs can be computed before training."""
    if not answers:
        return []
    if len(answers) == 1:
        where = answers[0][0].example.get("_where", "data").rsplit(", ", 1)[0]  # the file, without its line
        raise DataError(where, None, "kto needs at least two examples in a split (the KL estimate pairs each "
                                     "prompt with another example's answer)")
    order = list(range(len(answers)))
    random.Random(seed).shuffle(order)
    other = {order[i]: order[(i + 1) % len(order)] for i in range(len(order))}
    items = []
    for i, (sample, good) in enumerate(answers):
        donor = answers[other[i]][0]
        prompt = sample.prompt_ids
        answer = donor.input_ids[len(donor.prompt_ids):][:max(max_length - len(prompt), 1)]  # within max_length
        mismatched = Sample(prompt + answer, [IGNORE] * len(prompt) + answer, sample.example)
        items.append(Preference(sample, mismatched, desirable=good))
    return items
