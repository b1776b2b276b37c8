"""Instruction templates: a row of a labeled table becomes (prompt, completion) text.

Templates are Jinja2, rendered in the sandbox (a config file must not be able to run code) with
StrictUndefined (a misspelled field is an error, not an empty string).
"""
from __future__ import annotations

from jinja2 import StrictUndefined, TemplateError, TemplateSyntaxError, UndefinedError, meta
from jinja2.sandbox import SandboxedEnvironment, SecurityError

from tailorlm.config import TemplateSpec
from tailorlm.errors import ConfigError, DataError
from tailorlm.tasks import get_task

_ENV = SandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=False, autoescape=False)


def _compile(source: str, where: str, config: str):
    try:
        return _ENV.from_string(source), meta.find_undeclared_variables(_ENV.parse(source))
    except TemplateSyntaxError as e:
        raise ConfigError(config, [f"{where} (template line {e.lineno}): {e.message}"]) from None


class PromptTemplate:
    """Renders examples to (prompt, completion); knows which data fields it needs."""

    def __init__(self, spec: TemplateSpec):
        # The preset gives every part the config leaves out. The instruction is rendered first and handed to
        # the prompt as `instruction`, so users can change either part alone.
        self.spec, self.task, self.source = spec, get_task(spec.preset, spec.entity_format), spec._source
        self._instruction, inst_vars = _compile(_pick(spec.instruction, self.task.instruction), "template.instruction", self.source)
        self._prompt, prompt_vars = _compile(_pick(spec.prompt, self.task.prompt), "template.prompt", self.source)
        self._completion, completion_vars = _compile(_pick(spec.completion, self.task.completion), "template.completion", self.source)
        # `instruction` in the prompt is the rendered instruction; inside the instruction it is a data field
        # (Alpaca's instruction column). `labels` is the answer set, not a field.
        self.input_fields = (inst_vars | (prompt_vars - {"instruction"})) - {"labels"}
        self.fields = self.input_fields | (completion_vars - {"labels"})
        self.label_field = self.task.label_field if self.task.label_field in completion_vars else None
        self.truncate_field = spec.truncate_field or next(
            (f for f in ("text", "context", "source", "question", "input") if f in self.fields), None)

    def prompt(self, example: dict, labels: list[str]) -> str:
        context = {**example, "labels": labels}
        context["instruction"] = self._render(self._instruction, context, example, "template.instruction")
        return self._render(self._prompt, context, example, "template.prompt")

    def completion(self, example: dict) -> str:
        return self._render(self._completion, example, example, "template.completion")

    def _render(self, template, context: dict, example: dict, name: str) -> str:
        try:
            return template.render(**context).strip()
        except UndefinedError as e:
            raise DataError(example.get("_where", "data"), None, f"{name}: {e.message}") from None
        except SecurityError as e:  # the sandbox stopped an attempt to reach Python internals
            raise ConfigError(self.source, [f"{name}: the template tried something templates may not do "
                                            f"({e}); templates can only format the row's fields"]) from None
        except (TemplateError, TypeError, ValueError, ArithmeticError, LookupError) as e:  # e.g. text + 1
            raise DataError(example.get("_where", "data"), None,
                            f"{name} (in {self.source}) cannot render this row: {type(e).__name__}: {e}") from None


def _pick(configured: str | None, preset: str) -> str:
    return preset if configured is None else configured
