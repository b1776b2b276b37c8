"""What an exported model must reproduce of training: the prompt layout, its end-of-turn token, and prompts.

Training wraps each prompt either in the model's chat template or, without one, in the plain layout
"{prompt}\\nAnswer:" (data/conversations.py ChatFormat). Every export carries that layout as a chat template, so
llama.cpp, Ollama or transformers' apply_chat_template render the prompt the model was trained on, and the
end-of-turn token the model learned to emit becomes the exported EOS.
"""
from __future__ import annotations

from dataclasses import dataclass

from tailorlm.config import RunConfig, TemplateSpec
from tailorlm.data.dataset import load_splits
from tailorlm.data.templates import PromptTemplate
from tailorlm.data.tokenize import ChatFormat, encode_examples
from tailorlm.errors import TailorError

# ChatFormat's plain layout as a Jinja2 chat template: a user turn is "{prompt}\nAnswer:", an earlier answer
# " {answer}\n\n" (how few-shot demonstrations are laid out). There is no system turn: the layout has none.
PLAIN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ message['content'] + '\nAnswer:' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + '\n\n' }}"
    "{% endif %}{% endfor %}")


@dataclass
class Layout:
    """The run's prompt layout, as the exported model carries it."""
    chat_template: str  # the model's own chat template, or PLAIN_CHAT_TEMPLATE
    uses_chat: bool  # False: the plain "Answer:" layout
    system: str | None  # the run's template.system (None: the chat template's own default, if any)
    end_of_turn: str  # the token training taught the model to emit after an answer
    end_of_turn_id: int


@dataclass
class PromptCase:
    """One of the run's own test examples, as training rendered it."""
    user: str | None  # the rendered user prompt (template.prompt); None for a conversation (several turns)
    messages: list[dict]  # what ChatFormat handed the chat template
    text: str  # the full prompt text (chat template or plain layout applied)
    ids: list[int]  # the prompt's token ids, exactly as training and evaluation fed them
    tools: list[dict] | None = None  # a conversation's tool schemas


def run_template_spec(cfg: RunConfig) -> TemplateSpec:
    """The template spec that decides the chat layout: the one all the run's tasks share."""
    specs = cfg.task_set()
    layouts = {(t.template.system, t.template.chat_template) for t in specs}
    if len(layouts) > 1:
        raise TailorError("the run's tasks use different system prompts or chat_template settings; "
                          "one exported model carries one chat layout")
    return specs[0].template


def run_layout(tokenizer, cfg: RunConfig) -> Layout:
    fmt = ChatFormat(tokenizer, run_template_spec(cfg))
    token, token_id = _end_of_turn(fmt)
    return Layout(tokenizer.chat_template if fmt.uses_chat else PLAIN_CHAT_TEMPLATE, fmt.uses_chat, fmt.system,
                  token, token_id)


def _end_of_turn(fmt: ChatFormat) -> tuple[str, int]:
    """The last special token of a training completion: what the model learned to end its answer with.

    Usually the EOS token; a template that closes turns with its own marker (<|im_end|> where EOS is
    <|endoftext|>) makes that marker the one to stop on."""
    ids = fmt.encode_completion(fmt.completion_text("Question", "answer"))
    special = set(fmt.tokenizer.all_special_ids)
    for token_id in reversed(ids):
        if token_id in special:
            return fmt.tokenizer.convert_ids_to_tokens(token_id), token_id
    eos = fmt.tokenizer.eos_token
    if eos is None:
        raise TailorError("the tokenizer has no EOS token, and training completions end with no special token: "
                          "an exported model would not know where to stop")
    return eos, fmt.tokenizer.eos_token_id


def training_prompts(trained, count: int = 3) -> list[PromptCase]:
    """The first `count` test examples of the run (a loaded models.trained.Trained), encoded exactly as training
    and evaluation encoded them. They come from the run's manifest, so the data files need not still exist;
    a run written before manifests existed reads its test split again from the config's paths."""
    cfg, entry = trained.task(trained.cfg.task_set()[0].name)
    spec = run_template_spec(trained.cfg)
    template = PromptTemplate(cfg.template)
    examples, labels = entry.examples, entry.labels
    if not examples:  # a legacy run: its manifest was rebuilt without examples
        try:
            splits = load_splits(cfg.data, template.fields, template.label_field, template.task)
        except TailorError as e:
            raise TailorError(f"the checks need the run's test data, which cannot be read now: {e} (runs written "
                              f"by this version keep a few test examples in manifest.json)") from None
        examples, labels = splits.test[:50], splits.labels
    fmt = ChatFormat(trained.tokenizer, spec)
    # a few dozen candidates, so that `count` remain when template.overlong=drop dropped some
    conversational = template.task.conversational
    samples, _ = encode_examples(examples, template, fmt, labels, spec, "last_assistant" if conversational else None)
    cases = []
    for sample in samples[:count]:
        if conversational:  # the conversation before its final reply, as evaluation prompted it
            before, tools = sample.example["messages"][:-1], sample.example.get("tools") or None
            text = fmt.render(before, add_generation_prompt=True, tools=tools)
            cases.append(PromptCase(None, before, text, sample.prompt_ids, tools))
            continue
        user = template.prompt(sample.example, labels)
        messages = fmt.messages(user, [])  # the message list training rendered
        cases.append(PromptCase(user, messages, fmt.prompt_text(user), sample.prompt_ids))
    if not cases:
        raise TailorError(f"no test example of the run fits template.max_length={spec.max_length}")
    return cases
