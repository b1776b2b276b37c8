"""The run's results: metrics.json, predictions.jsonl, a loss-curve PNG and report.md, plus the terminal table."""
from __future__ import annotations

import json
from pathlib import Path

from rich.table import Table

from tailorlm.ui import console

# One set of column names for the terminal table and report.md; the last is the fine-tuned gain in
# accuracy points over the best prompting variant.
COLUMNS = ("variant", "accuracy", "macro-F1", "valid answers", "vs prompting")
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


def plot_losses(path: Path, train_loss: list[dict], val_loss: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    if train_loss:
        ax.plot([r["step"] for r in train_loss], [r["loss"] for r in train_loss], label="train", alpha=0.8)
    if val_loss:
        ax.plot([r["step"] for r in val_loss], [r["loss"] for r in val_loss], "o-", label="validation")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss per completion token")
    ax.set_title("Training and validation loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def comparison_rows(variants: dict[str, dict]) -> list[tuple[str, str, str, str, str]]:
    best_prompting = max((m["accuracy"] for v, m in variants.items() if v != "fine_tuned"), default=None)
    rows = []
    for name, m in variants.items():
        gain = ""
        if name == "fine_tuned" and best_prompting is not None:
            gain = f"{(m['accuracy'] - best_prompting) * 100:+.1f} pts"
        rows.append((VARIANT_TITLES.get(name, name), f"{m['accuracy']:.3f}", f"{m['macro_f1']:.3f}",
                     f"{m['valid']:.0%}", gain))
    return rows


def print_table(variants: dict[str, dict], n_test: int) -> None:
    table = Table(title=f"Test split, {n_test} examples, metrics on generated text")
    for column in COLUMNS:
        table.add_column(column, justify="left" if column == "variant" else "right", no_wrap=True)
    for row in comparison_rows(variants):
        table.add_row(*row, style="bold green" if row[0] == "fine-tuned" else None)
    console.print(table)


def write_report(path: Path, title: str, facts: dict[str, str], variants: dict[str, dict], labels: list[str]) -> None:
    lines = [f"# {title}", ""]
    lines += [f"- **{k}:** {v}" for k, v in facts.items()]
    lines += ["", "## Prompting vs fine-tuning (test split, metrics on generated text)", "",
              "| " + " | ".join(COLUMNS) + " |", "|---|---:|---:|---:|---:|"]
    lines += ["| " + " | ".join(row) + " |" for row in comparison_rows(variants)]
    lines += ["", "## Loss", "", "![loss curve](loss_curve.png)", ""]
    for name, m in variants.items():
        cols = labels + (["(invalid)"] if any("(invalid)" in r for r in m["confusion"].values()) else [])
        lines += [f"## Confusion: {VARIANT_TITLES.get(name, name)} (rows: expected, columns: predicted)", "",
                  "| expected | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
        for gold in labels:
            row = m["confusion"].get(gold, {})
            lines.append(f"| {gold} | " + " | ".join(str(row.get(c, 0)) for c in cols) + " |")
        lines.append("")
    path.write_text("\n".join(lines))
