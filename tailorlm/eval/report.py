"""The run's results: metrics.json, predictions.jsonl, a loss-curve PNG and report.md, plus the terminal table."""
from __future__ import annotations

import json
from pathlib import Path

from rich.table import Table

from tailorlm.ui import console

# Column titles for the terminal table and report.md. The table shows the task's metrics (tasks.py); the last
# column is the fine-tuned gain, in points of the headline metric, over the best prompting variant.
TITLES = {"accuracy": "accuracy", "macro_f1": "macro-F1", "valid": "valid answers", "f1": "entity F1",
          "precision": "precision", "recall": "recall", "exact_match": "exact match", "token_f1": "token F1",
          "bleu": "BLEU", "chrf": "chrF", "answered": "answered", "rouge_l": "ROUGE-L"}
PERCENT = {"valid", "answered"}  # shares, shown as %
SCALE_100 = {"bleu", "chrf"}  # sacrebleu reports 0-100; the others are 0-1
VARIANT_TITLES = {"zero_shot": "zero-shot prompting", "few_shot": "few-shot prompting", "fine_tuned": "fine-tuned"}


def write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
    tmp.replace(path)  # readers never see a half-written file


def write_predictions(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    with tmp.open("w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)


def format_metric(key: str, value) -> str:
    if value is None:
        return "-"
    return f"{value:.0%}" if key in PERCENT else f"{value:.1f}" if key in SCALE_100 else f"{value:.3f}"


def header(columns: tuple[str, ...]) -> list[str]:
    return ["variant", *(TITLES.get(c, c) for c in columns), "vs prompting"]


def comparison_rows(variants: dict[str, dict], columns: tuple[str, ...]) -> list[tuple[str, ...]]:
    headline = columns[0]
    best_prompting = max((m[headline] for v, m in variants.items() if v != "fine_tuned"), default=None)
    rows = []
    for name, m in variants.items():
        gain = ""
        if name == "fine_tuned" and best_prompting is not None:
            points = (m[headline] - best_prompting) * (1 if headline in SCALE_100 else 100)
            gain = f"{points:+.1f} pts"
        rows.append((VARIANT_TITLES.get(name, name), *(format_metric(c, m.get(c)) for c in columns), gain))
    return rows


def print_table(variants: dict[str, dict], n_test: int, columns: tuple[str, ...], task: str | None = None) -> None:
    table = Table(title=f"{task + ': test' if task else 'Test'} split, {n_test} examples, metrics on generated text")
    for column in header(columns):
        table.add_column(column, justify="left" if column == "variant" else "right", no_wrap=True)
    for row in comparison_rows(variants, columns):
        table.add_row(*row, style="bold green" if row[0] == "fine-tuned" else None)
    console.print(table)


def write_report(path: Path, title: str, facts: dict[str, str], sections: dict[str, dict],
                 training: list[str] = ()) -> None:
    """report.md: one comparison table per task (sections: task name -> its metrics.json entry), then the
    training section (eval/training_report.py) and the confusion tables."""
    lines = [f"# {title}", ""]
    lines += [f"- **{k}:** {v}" for k, v in facts.items()]
    for name, section in sections.items():
        columns, variants, labels = tuple(section["columns"]), section["variants"], section["labels"]
        heading = "Prompting vs fine-tuning" + (f": {name}" if len(sections) > 1 else "")
        lines += ["", f"## {heading} (test split, {section['n_test']} examples, metrics on generated text)", "",
                  "| " + " | ".join(header(columns)) + " |", "|---|" + "---:|" * (len(columns) + 1)]
        lines += ["| " + " | ".join(row) + " |" for row in comparison_rows(variants, columns)]
    lines += ["", "## Loss", "", "![loss curve](loss_curve.png)", "", *training]
    for section in sections.values():
        labels = section["labels"]
        for name, m in section["variants"].items():
            if "confusion" not in m:
                continue
            cols = labels + (["(invalid)"] if any("(invalid)" in r for r in m["confusion"].values()) else [])
            lines += [f"## Confusion: {VARIANT_TITLES.get(name, name)} (rows: expected, columns: predicted)", "",
                      "| expected | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
            for gold in labels:
                row = m["confusion"].get(gold, {})
                lines.append(f"| {gold} | " + " | ".join(str(row.get(c, 0)) for c in cols) + " |")
            lines.append("")
    path.write_text("\n".join(lines))
