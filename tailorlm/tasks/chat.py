"""Multi-turn conversations (OpenAI `messages`, ShareGPT `conversations`, with tool calls): the preset and
its score on the held-out final assistant turn.

A conversation is trained under the model's own chat template (data/conversations.py) with the loss on the
assistant turns that template.train_on picks. Evaluation asks the model for each held-out conversation's
final reply, given everything before it, and scores it with ROUGE-L against the real reply; when that
reply is a tool call, the call itself is checked (name and arguments, exactly).

The template fields are derived from the conversation: `context` (the turns before the final reply, one
'role: text' line each) and `output` (the final reply, or its calls as JSON), so duplicate and leakage
checks and prediction files read the conversation as text.
"""
from __future__ import annotations

import json

from tailorlm.tasks.base import Task, check_lengths, ratio
from tailorlm.tasks.instruction import rouge_l


def final_reply(messages: list[dict]) -> dict:
    return next(m for m in reversed(messages) if m["role"] == "assistant")


def _calls(message: dict) -> list[dict]:
    return [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
            for c in message.get("tool_calls") or []]


def _line(message: dict) -> str:
    calls = _calls(message)
    return f"{message['role']}: {json.dumps(calls) if calls else message['content']}"


def derive(example: dict) -> dict:
    messages = example["messages"]
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    calls = _calls(messages[last])
    return {"context": "\n".join(_line(m) for m in messages[:last]),
            "output": json.dumps(calls) if calls else messages[last]["content"]}


def calls_in(text: str) -> list[dict]:
    """Every JSON object in generated text that names a call ({"name": ..., "arguments"|"parameters": {...}}),
    whatever tags the template wraps them in (<tool_call>, [TOOL_CALLS], a code block)."""
    decoder, found, at = json.JSONDecoder(), [], 0
    while (start := text.find("{", at)) != -1:
        try:
            value, end = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            at = start + 1
            continue
        at = end
        for obj in value if isinstance(value, list) else [value]:
            if isinstance(obj, dict) and isinstance(obj.get("name"), str):
                arguments = obj.get("arguments", obj.get("parameters", {}))
                if isinstance(arguments, str):  # OpenAI's wire format writes them as a JSON string
                    try:
                        arguments = json.loads(arguments)
                    except json.JSONDecodeError:
                        pass
                found.append({"name": obj["name"], "arguments": arguments})
    return found


def score(generated: list[str], examples: list[dict], labels: list[str]) -> tuple[dict, list]:
    check_lengths(generated, examples)
    predicted = [g.strip() for g in generated]
    metrics = rouge_l(predicted, [ex["output"] for ex in examples])
    with_calls = [(p, _calls(final_reply(ex["messages"]))) for p, ex in zip(predicted, examples)]
    with_calls = [(p, calls) for p, calls in with_calls if calls]
    # Exact match of the calls (names and arguments, in order), over the turns whose real reply is a call.
    metrics["call_match"] = ratio(sum(calls_in(p) == calls for p, calls in with_calls), len(with_calls)) \
        if with_calls else None
    return metrics, predicted


TASK = Task("chat", "", "{{ context }}", "{{ output }}", ("rouge_l", "call_match"), score, max_new_tokens=128,
            structured=frozenset({"messages", "tools"}), optional=frozenset({"tools"}),
            derived=frozenset({"context", "output"}), derive=derive, conversational=True)
