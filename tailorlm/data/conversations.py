"""Multi-turn conversations -> token ids with an exact loss mask per assistant turn, under the model's own
chat template.

Which turns carry loss: every assistant turn (`all_assistant`, the default), only the last
(`last_assistant`), and in either mode an assistant message with OpenAI's `"weight": 0` carries none. A turn
that carries loss does so for its reply and the end-of-turn token that closes it; nothing from system, user
or tool turns ever does.

How the mask is made exact for any template. For each assistant turn the template renders the conversation
up to that turn with the generation prompt (what a model is fed before it answers), and again with the turn
itself; the reply is the difference, up to its end-of-turn token. The whole conversation must then be those
pieces end to end: a template that renders a turn differently once later turns follow (one that strips
reasoning from history, say) would make the training text differ from what the model sees at inference, and
is refused by name rather than trained with a wrong mask. The pieces are tokenized one by one, as generation
sees them (the prompt, then the tokens the model writes); they must also equal the tokens of the whole text,
so the boundaries between turns fall between tokens.

ChatFormat, the wrapper over the model's chat template that tokenize.py, evaluation and serving use, lives
here beside the end-of-turn helpers it calls: tokenize.py builds on this module, not the other way round.
"""
from __future__ import annotations

from typing import Literal

from tailorlm.config import TemplateSpec
from tailorlm.data.samples import IGNORE, Sample
from tailorlm.errors import TailorError

TrainOn = Literal["all_assistant", "last_assistant"]


# The tokens that close a turn in the families' chat templates. A tokenizer's eos is not always one of them
# (Phi-3's is <|endoftext|>, its turns end with <|end|>), so the reply is cut at the first of either.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<end_of_turn>", "<|end|>")


def end_of_turn_markers(tokenizer) -> list[str]:
    """The eos and the known end-of-turn tokens that this tokenizer has."""
    vocab = tokenizer.get_vocab()
    return list(dict.fromkeys(t for t in (tokenizer.eos_token, *END_OF_TURN) if t and t in vocab))


def through_end_of_turn(tail: str, markers: list[str]) -> str:
    """A reply's text through the first end-of-turn token: what follows (a newline) is never generated."""
    ends = [tail.index(m) + len(m) for m in markers if m in tail]
    return tail[:min(ends)] if ends else tail


class ChatFormat:
    """Wraps prompts in the tokenizer's chat template when it has one, or in a plain 'Answer:' layout."""

    def __init__(self, tokenizer, spec: TemplateSpec):
        self.tokenizer = tokenizer
        self.system = spec.system
        self.uses_chat = spec.chat_template == "auto" and bool(getattr(tokenizer, "chat_template", None))
        self.end_markers = end_of_turn_markers(tokenizer)  # once: reading the vocabulary costs its size

    def messages(self, prompt: str, demos) -> list[dict]:
        """The chat messages a prompt is rendered from: system, demonstrations as turns, then the prompt."""
        messages = [{"role": "system", "content": self.system}] if self.system else []
        for demo_prompt, demo_completion in demos:
            messages += [{"role": "user", "content": demo_prompt}, {"role": "assistant", "content": demo_completion}]
        return messages + [{"role": "user", "content": prompt}]

    def prompt_text(self, prompt: str, demos: list[tuple[str, str]] = ()) -> str:
        if self.uses_chat:
            return self.render(self.messages(prompt, demos), add_generation_prompt=True)
        shots = "".join(f"{p}\nAnswer: {c}\n\n" for p, c in demos)
        return f"{shots}{prompt}\nAnswer:"

    def completion_text(self, prompt: str, completion: str) -> str:
        """The text after the prompt, up to and including the end-of-turn token the model must learn to emit."""
        eos = self.tokenizer.eos_token or ""
        if not self.uses_chat:
            return f" {completion}{eos}"
        head = self.prompt_text(prompt)
        full = self.render(self.messages(prompt, []) + [{"role": "assistant", "content": completion}])
        if not full.startswith(head):  # a template that rewrites earlier turns: fall back to the plain answer
            return f"{completion}{eos}"
        tail = full[len(head):]
        return through_end_of_turn(tail, self.end_markers)

    @property
    def model_name(self) -> str:
        return getattr(self.tokenizer, "name_or_path", "") or "the model"

    def render(self, messages: list[dict], add_generation_prompt: bool = False, tools: list[dict] | None = None) -> str:
        """A conversation as the model's chat template writes it (with the tool schemas, when given); transformers
        renders it in a Jinja sandbox, and its failures name the model."""
        from jinja2 import TemplateError

        extra = {"tools": tools} if tools else {}
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                                      **extra)
        except (TemplateError, TypeError, ValueError) as e:  # SecurityError is a TemplateError
            raise TailorError(f"the chat template of {self.model_name} "
                              f"(tokenizer_config.json / chat_template.jinja) failed: {type(e).__name__}: {e}; "
                              f"fix the template, or set template.chat_template=never for the plain layout") from None

    def encode_prompt(self, text: str) -> list[int]:
        # A chat template writes its own special tokens (BOS included, where the model uses one).
        return self.tokenizer(text, add_special_tokens=not self.uses_chat)["input_ids"]

    def encode_completion(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]


def loss_turns(messages: list[dict], train_on: TrainOn = "all_assistant") -> list[int]:
    """Indexes of the assistant messages whose reply carries loss."""
    replies = [i for i, m in enumerate(messages) if m["role"] == "assistant" and m.get("weight", 1) != 0]
    if train_on == "last_assistant":
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        return [last] if last in replies else []
    return replies


def conversation_pieces(fmt: ChatFormat, messages: list[dict], train_on: TrainOn = "all_assistant",
                        tools: list[dict] | None = None) -> list[tuple[str, bool]]:
    """The conversation's text as (piece, carries loss) in order, ending with the last reply that carries loss."""
    if not fmt.uses_chat:
        raise TailorError("multi-turn conversations need the model's chat template; this model has none (or "
                          "template.chat_template is 'never')")
    name = fmt.model_name
    full = fmt.render(messages, tools=tools)
    pieces, at = [], 0
    for i in loss_turns(messages, train_on):
        if i == 0 or all(m["role"] == "system" for m in messages[:i]):
            raise TailorError(f"assistant turn {i + 1} comes before any user turn: there is no prompt to answer; "
                              f"give it weight 0 or start the conversation with the user")
        head = fmt.render(messages[:i], add_generation_prompt=True, tools=tools)
        through = fmt.render(messages[:i + 1], tools=tools)
        if not through.startswith(head):
            raise TailorError(f"the chat template of {name} renders assistant turn {i + 1} so that the text before "
                              f"it is not what the model is prompted with; its loss mask cannot be exact")
        reply = through_end_of_turn(through[len(head):], fmt.end_markers)
        if not full.startswith(head + reply) or len(head) < at:
            raise TailorError(f"the chat template of {name} renders assistant turn {i + 1} differently once later "
                              f"turns follow (it rewrites history), so training on every turn would teach text the "
                              f"model never sees at inference; use template.train_on=last_assistant")
        pieces += [(head[at:], False), (reply, True)]
        at = len(head) + len(reply)
    return [(text, loss) for text, loss in pieces if text]


def encode_conversation(fmt: ChatFormat, messages: list[dict], train_on: TrainOn = "all_assistant",
                        tools: list[dict] | None = None, max_length: int | None = None) -> Sample | None:
    """Token ids of the conversation (through its last reply that carries loss) with the exact mask; the
    sample's example holds the messages it covers.

    Longer than max_length, the conversation ends after the last reply that carries loss and fits, so every
    kept reply keeps all of its context; under last_assistant that reply becomes the one trained (a held-out
    conversation is then scored on a reply that fits). None when not even the first reply fits."""
    pieces = _tokenized(fmt, conversation_pieces(fmt, messages, train_on, tools))
    if not any(loss for _, _, loss in pieces):
        raise TailorError("no assistant turn carries loss in this conversation (every reply has weight 0, or "
                          "train_on=last_assistant and the last reply has weight 0)")
    turns = loss_turns(messages, train_on)  # the message of each reply that carries loss, in order
    n = _fitting(pieces, max_length)
    only_last = n < len(pieces) and train_on == "last_assistant"
    if only_last:  # the same text split at every reply, cut at the last that fits, and only that one trained
        try:
            pieces = _tokenized(fmt, conversation_pieces(fmt, messages, "all_assistant", tools))
        except TailorError:  # a template that rewrites history cannot be cut at an earlier reply
            return None
        turns, n = loss_turns(messages, "all_assistant"), _fitting(pieces, max_length)
    if not n:
        return None
    kept = pieces[:n]
    last_message = turns[sum(1 for _, _, loss in kept if loss) - 1]
    if only_last:
        kept = [(text, piece_ids, i == n - 1) for i, (text, piece_ids, _) in enumerate(kept)]
    ids = [t for _, piece_ids, _ in kept for t in piece_ids]
    labels = [t if loss else IGNORE for _, piece_ids, loss in kept for t in piece_ids]
    if fmt.tokenizer("".join(text for text, _, _ in kept), add_special_tokens=False)["input_ids"] != ids:
        raise TailorError(f"the chat template of {fmt.model_name} joins turns inside a token (the turn pieces tokenize "
                          f"differently alone than together), so no exact per-turn mask exists")
    return Sample(ids, labels, {"messages": messages[:last_message + 1]})


def _tokenized(fmt: ChatFormat, pieces: list[tuple[str, bool]]) -> list[tuple[str, list[int], bool]]:
    """Each piece tokenized alone, as generation sees it (the prompt, then the tokens the model writes)."""
    return [(text, fmt.tokenizer(text, add_special_tokens=False)["input_ids"], loss) for text, loss in pieces]


def _fitting(pieces: list[tuple[str, list[int], bool]], max_length: int | None) -> int:
    """How many leading pieces to keep: all that fit in max_length, back to the last reply that carries loss."""
    n, length = 0, 0
    for _, ids, _ in pieces:
        if max_length is not None and length + len(ids) > max_length:
            break
        n, length = n + 1, length + len(ids)
    while n and not pieces[n - 1][2]:
        n -= 1
    return n
