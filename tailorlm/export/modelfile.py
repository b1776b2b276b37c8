"""The Ollama Modelfile written beside a GGUF: the training prompt layout as Ollama's Go template.

Ollama does not run the chat template stored in the GGUF; it renders the Modelfile's TEMPLATE with .System and
.Prompt. So the layout training used is translated, per chat-template family, into that syntax, and checked
after writing by render_template (a minimal renderer for exactly the constructs emitted here).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from tailorlm.errors import TailorError
from tailorlm.export.layout import Layout

# ChatML (SmolLM2, Qwen, ...): Ollama's own ChatML template, single turn. No whitespace trimming ({{- -}}) is
# used, so the text between tags is the prompt text verbatim.
CHATML_TEMPLATE = ("{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
                   "{{ if .Prompt }}<|im_start|>user\n{{ .Prompt }}<|im_end|>\n{{ end }}<|im_start|>assistant\n")
# ChatFormat's plain layout, used when the model has no chat template (or template.chat_template=never).
PLAIN_TEMPLATE = "{{ .Prompt }}\nAnswer:"

_CHATML_DEFAULT_SYSTEM = re.compile(r"^<\|im_start\|>system\n(.*?)<\|im_end\|>\n", re.DOTALL)


@dataclass
class OllamaLayout:
    family: str  # "chatml" or "plain"
    template: str  # TEMPLATE, in Ollama's Go-template syntax
    system: str | None  # SYSTEM: the run's system prompt, or the chat template's default one
    stops: list[str]  # PARAMETER stop: the end-of-turn tokens


def ollama_layout(layout: Layout, tokenizer) -> OllamaLayout:
    """The Ollama form of the run's layout; a clear error for a chat template it cannot translate."""
    if not layout.uses_chat:
        return OllamaLayout("plain", PLAIN_TEMPLATE, None, [layout.end_of_turn])
    if "<|im_start|>" in layout.chat_template and "<|im_end|>" in layout.chat_template:
        system = layout.system if layout.system else _chatml_default_system(tokenizer, layout.chat_template)
        return OllamaLayout("chatml", CHATML_TEMPLATE, system, list(dict.fromkeys([layout.end_of_turn, "<|im_end|>"])))
    markers = sorted(set(re.findall(r"<\|?[a-z_]+\|?>|\[INST\]", layout.chat_template)))[:4]
    raise TailorError("cannot write an Ollama Modelfile for this chat template: only ChatML (<|im_start|>) and "
                      "the plain 'Answer:' layout are translated so far"
                      + (f" (the template uses {', '.join(markers)})" if markers else ""))


def _chatml_default_system(tokenizer, chat_template: str) -> str | None:
    """The system prompt a ChatML template writes when the conversation has none (SmolLM2's does)."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], chat_template=chat_template,
                                         tokenize=False, add_generation_prompt=True)
    match = _CHATML_DEFAULT_SYSTEM.match(text)
    return match.group(1) if match else None


def modelfile_text(gguf_name: str, ollama: OllamaLayout) -> str:
    for part in filter(None, (ollama.template, ollama.system)):
        if '"""' in part:
            raise TailorError('the prompt layout contains """, which a Modelfile cannot quote')
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{ollama.template}"""']
    if ollama.system:
        lines.append(f'SYSTEM """{ollama.system}"""')
    lines += [f'PARAMETER stop "{stop}"' for stop in ollama.stops]
    lines.append("PARAMETER temperature 0")  # the model was evaluated with greedy decoding
    return "\n".join(lines) + "\n"


def read_modelfile(text: str) -> dict[str, str]:
    """TEMPLATE and SYSTEM of a Modelfile written by modelfile_text (triple-quoted values)."""
    fields = re.findall(r'^(TEMPLATE|SYSTEM) """(.*?)"""', text, re.MULTILINE | re.DOTALL)
    return {key.lower(): value for key, value in fields}


_IF_BLOCK = re.compile(r"\{\{ if \.(\w+) \}\}(.*?)\{\{ end \}\}", re.DOTALL)
_VARIABLE = re.compile(r"\{\{ \.(\w+) \}\}")


def render_template(template: str, values: dict[str, str]) -> str:
    """Render the Go-template constructs modelfile_text emits: {{ if .X }}...{{ end }} (not nested) and {{ .X }}.

    Any other construct is an error, so a template this cannot render never passes a check by accident."""
    skeleton = _VARIABLE.sub("", _IF_BLOCK.sub(lambda m: m.group(2), template))
    if "{{" in skeleton:
        raise TailorError("the Modelfile template uses a construct the checker cannot render: "
                          f"{skeleton[skeleton.index('{{'):][:40]}")
    text = _IF_BLOCK.sub(lambda m: m.group(2) if values.get(m.group(1)) else "", template)
    return _VARIABLE.sub(lambda m: values.get(m.group(1), ""), text)
