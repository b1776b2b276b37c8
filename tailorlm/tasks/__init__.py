"""Task presets: what a kind of task looks like from data to score.

A preset is a template (instruction, prompt layout, completion), the fields it reads, how the generated
text is turned back into an answer, and the metrics computed on that answer. Everything else (loading,
training, generation) is the same for every task, so adding a task means adding one module here (its
parsing, metrics and `TASK`) and one entry in TASKS below.

Metrics are computed on generated text, never on teacher-forced tokens: the same numbers for the
prompting baselines and for the fine-tuned model.

The package sits below data and eval (both read presets) and imports nothing from either, so a preset's
scoring lives here rather than in eval/: the import-linter layers contract in pyproject.toml keeps it so.
"""
from __future__ import annotations

from tailorlm.tasks import chat, classification, instruction, math_problems, ner, qa, translation
from tailorlm.tasks.base import Scorer, Task

TASKS: dict[str, Task] = {m.TASK.name: m.TASK for m in
                          [classification, ner, qa, translation, math_problems, instruction, chat]}


def get_task(name: str, entity_format: str = "inline") -> Task:
    """A preset's task; extraction's depends on how its answers are written (template.entity_format)."""
    return ner.TASKS[entity_format] if name == "ner" else TASKS[name]


__all__ = ["TASKS", "Scorer", "Task", "get_task"]
