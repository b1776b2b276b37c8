"""Instruction templates: a row of a labeled table becomes (prompt, completion) text.

Templates are Jinja2, rendered in the sandbox (a config file must not be able to run code) with
StrictUndefined (a misspelled field is an error, not an empty string).
"""
from __future__ import annotations

from jinja2 import StrictUndefined, TemplateSyntaxError, UndefinedError, meta
from jinja2.sandbox import SandboxedEnvironment

from tailorlm.config import TemplateSpec
from tailorlm.errors import ConfigError, DataError

# Each preset is the prompt layout for one kind of task. The instruction is rendered first and handed
# to the prompt as `instruction`, so users can change either part alone.
PRESET_PROMPTS = {
    "classification": "{{ instruction }}\n\nText: {{ text }}",
}

_ENV = SandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=False, autoescape=False)


def _compile(source: str, where: str):
    try:
        return _ENV.from_string(source), meta.find_undeclared_variables(_ENV.parse(source))
    except TemplateSyntaxError as e:
        raise ConfigError("template", [f"{where} (template line {e.lineno}): {e.message}"]) from None


class PromptTemplate:
    """Renders examples to (prompt, completion); knows which data fields it needs."""

    def __init__(self, spec: TemplateSpec):
        self.spec = spec
        self._instruction, inst_vars = _compile(spec.instruction, "template.instruction")
        prompt_source = spec.prompt if spec.prompt is not None else PRESET_PROMPTS[spec.preset]
        self._prompt, prompt_vars = _compile(prompt_source, "template.prompt")
        self._completion, completion_vars = _compile(spec.completion, "template.completion")
        provided = {"instruction", "labels"}
        self.fields = (inst_vars | prompt_vars | completion_vars) - provided
        self.label_field = "label" if "label" in completion_vars else None

    def prompt(self, example: dict, labels: list[str]) -> str:
        context = {**example, "labels": labels}
        context["instruction"] = self._render(self._instruction, context, example, "template.instruction")
        return self._render(self._prompt, context, example, "template.prompt")

    def completion(self, example: dict) -> str:
        return self._render(self._completion, example, example, "template.completion")

    @staticmethod
    def _render(template, context: dict, example: dict, name: str) -> str:
        try:
            return template.render(**context).strip()
        except UndefinedError as e:
            raise DataError(example.get("_where", "data"), None, f"{name}: {e.message}") from None
