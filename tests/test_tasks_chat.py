"""The chat preset: its derived fields, its score on the final reply (ROUGE-L, exact tool calls), and the
preflight's look at real chat logs (one-word replies, keyboard mash)."""
import json

import pytest

from tailorlm.data.quality import keyboard_mash, weak_replies
from tailorlm.tasks.chat import TASK, calls_in, derive

CALL = {"type": "function", "function": {"name": "weather", "arguments": {"city": "Oslo"}}}
ASKS = [{"role": "user", "content": "Weather in Oslo?"}, {"role": "assistant", "content": "", "tool_calls": [CALL]}]
TALKS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
         {"role": "assistant", "content": "hello there"}, {"role": "user", "content": "how are you"},
         {"role": "assistant", "content": "I am fine thanks"}]


def example(messages):
    return {"messages": messages, **derive({"messages": messages})}


def test_the_fields_are_the_turns_before_the_final_reply_and_the_reply():
    assert derive({"messages": TALKS}) == {
        "context": "system: Be brief.\nuser: hi\nassistant: hello there\nuser: how are you",
        "output": "I am fine thanks"}
    assert derive({"messages": ASKS})["output"] == '[{"name": "weather", "arguments": {"city": "Oslo"}}]'


@pytest.mark.parametrize("text, calls", [
    ('<tool_call>\n{"name": "weather", "arguments": {"city": "Oslo"}}\n</tool_call>', [{"name": "weather", "arguments": {"city": "Oslo"}}]),
    ('[TOOL_CALLS] [{"name": "weather", "arguments": {"city": "Oslo"}}]', [{"name": "weather", "arguments": {"city": "Oslo"}}]),
    ('{"name": "weather", "parameters": {"city": "Oslo"}}', [{"name": "weather", "arguments": {"city": "Oslo"}}]),
    ('I would call {weather} for {"city": "Oslo"}', []),
    ('{"name": "weather", "arguments": {"city": "Oslo"', []),
])
def test_calls_are_read_from_whatever_tags_wrap_them(text, calls):
    assert calls_in(text) == calls


def test_the_score_is_rouge_l_on_replies_and_exact_match_on_calls():
    examples = [example(TALKS), example(ASKS), example(ASKS)]
    generated = ["I am fine thanks", '<tool_call>{"name": "weather", "arguments": {"city": "Oslo"}}</tool_call>',
                 '<tool_call>{"name": "weather", "arguments": {"city": "Bergen"}}</tool_call>']
    metrics, predicted = TASK.score(generated, examples, [])
    assert metrics["call_match"] == 0.5 and predicted == generated
    per_row = [TASK.score([g], [ex], [])[0]["rouge_l"] for g, ex in zip(generated, examples)]
    assert per_row[0] == 1.0 and per_row[1] > per_row[2] > 0  # the call's text is compared too: Bergen is not Oslo
    assert metrics["rouge_l"] == pytest.approx(sum(per_row) / 3)
    plain, _ = TASK.score(["fine"], [example(TALKS)], [])
    assert plain["call_match"] is None and 0 < plain["rouge_l"] < 1  # no call to match: no figure, not a zero


def test_keyboard_mash_is_told_from_words_that_happen_to_run_along_a_row():
    assert [t for t in ["asdfasdf", "qwertyuiop", "sdfghj", "Trndsttr lucian remix", "hjklhjkl"] if keyboard_mash(t)] \
        == ["asdfasdf", "qwertyuiop", "sdfghj", "Trndsttr lucian remix", "hjklhjkl"]
    assert not any(keyboard_mash(t) for t in ["my property", "pretty typewriter", "hmmmmm", "rhythms", "nooooo",
                                              "hahahaha", "asd", "ok"])
    assert weak_replies(["yes", "asdf", "I am fine", "Hi!"]) == ([0, 1, 3], [1])
    assert json.dumps(weak_replies([])) == "[[], []]"
