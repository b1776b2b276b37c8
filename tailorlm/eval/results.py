"""What a run measured on its test splits, typed: one TaskResults per task (a single-task run has one), whose
JSON is that task's section of metrics.json. The evaluate stage builds them, the report and the API read them."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TaskResults:
    """One task's test figures: every variant's metrics (prompting kinds, the classic model, fine-tuned), the best
    prompting result and the k-shot curve, with what qualifies them. Its to_json is the task's metrics.json
    section."""
    preset: str
    headline: str
    columns: list[str]
    variants: dict[str, dict]
    best_prompting: dict | None
    curve: dict
    labels: list[str]
    n_test: int
    trivial: list[str]  # why the score may not be a result: a single label in the test split
    contamination: dict | None  # test rows also in train
    # eval.decoding=auto: {"chosen": the fine-tuned variant validation preferred, "validation": kind -> headline}
    decoding: dict | None = None

    @property
    def chosen(self) -> str:
        """The fine-tuned variant that is the run's answer: fine_tuned, or the decoding validation chose."""
        return (self.decoding or {}).get("chosen", "fine_tuned")

    @property
    def fine_tuned(self) -> float | None:
        return self.variants.get(self.chosen, {}).get(self.headline)

    @classmethod
    def from_json(cls, section: dict) -> TaskResults:
        """A metrics.json section (RunDir.metrics upgrades older layouts first)."""
        return cls(section["task"], section["headline"], list(section["columns"]), section["variants"],
                   section.get("best_prompting"), section.get("curve") or {}, list(section.get("labels") or []),
                   section["n_test"], list(section.get("trivial") or []), section.get("contamination"),
                   section.get("decoding"))

    def to_json(self) -> dict:
        return {"task": self.preset, "headline": self.headline, "columns": self.columns, "variants": self.variants,
                "best_prompting": self.best_prompting, "curve": self.curve, "labels": self.labels,
                "n_test": self.n_test, "trivial": self.trivial, "contamination": self.contamination,
                **({"decoding": self.decoding} if self.decoding else {})}


@dataclass
class Results:
    """What the run measured on the test splits: one TaskResults per task, and every test prediction."""
    tasks: dict[str, TaskResults]
    predictions: list[dict]

    def sections(self) -> dict[str, dict]:
        return {name: task.to_json() for name, task in self.tasks.items()}
