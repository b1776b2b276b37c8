"""The k-shot curve in words and as a picture: prompting quality against the number of demonstrations, with
the fine-tuned model as a line above or below it, and where more demonstrations stopped helping."""
from __future__ import annotations

from pathlib import Path

KIND_WORDS = {"likelihood": "label likelihood", "constrained": "constrained decoding", "free": "free generation"}


def _fmt(metric: str, value: float) -> str:
    return f"{value:.1f}" if metric in ("bleu", "chrf") else f"{value:.3f}"


def curve_summary(curve: dict | None) -> str | None:
    """One line: the values by k, the best k, and how many demonstrations did not fit."""
    if not curve or not curve.get("points"):
        return None
    metric, points = curve["metric"], curve["points"]
    values = ", ".join(f"k={p['k']} {_fmt(metric, p['value'])}" for p in points)
    line = f"k-shot curve ({KIND_WORDS.get(curve['kind'], curve['kind'])}, {curve['demos']} demos): {values}"
    if len(points) > 1:
        later = [p["k"] for p in points if p["k"] > curve["best_k"]]
        line += f"; best at k={curve['best_k']}" + (f", no gain from k={later[0]} on" if later else "")
    dropped = sum(p["dropped_demos"] for p in points)
    if dropped:
        line += f"; {dropped} demonstrations dropped to fit eval.max_prompt_tokens"
    return line


def curve_lines(curve: dict | None, fine_tuned: float | None, task: str) -> list[str]:
    """report.md's curve section for one task: a table (k, score, rows, prompt tokens, demos dropped) and the
    plot, which lives in the task's folder (curve_file)."""
    if not curve or not curve.get("points"):
        return []
    metric = curve["metric"]
    lines = ["", f"## The k-shot curve: {task}", "",
             f"Prompting the base model with k demonstrations ({curve['demos']}) from the training split, scored by "
             f"{KIND_WORDS.get(curve['kind'], curve['kind'])}. Inner points use the rows listed.", "",
             f"| k | {metric} | test rows | prompt tokens | demos dropped |", "|---:|---:|---:|---:|---:|"]
    lines += [f"| {p['k']} | {_fmt(metric, p['value'])} | {p['rows']} | {p['prompt_tokens']:.0f} | {p['dropped_demos']} |"
              for p in curve["points"]]
    if fine_tuned is not None:
        lines += ["", f"Fine-tuned: {_fmt(metric, fine_tuned)}."]
    summary = curve_summary(curve)
    lines += ["", summary] if summary else []
    if len(curve["points"]) > 1:
        lines += ["", f"![k-shot curve]({curve_file(task)})"]
    return lines


def curve_file(task: str) -> str:
    """The curve's picture, relative to the run folder: beside the task's other reports."""
    return f"tasks/{task}/k_shot_curve.png"


def plot_curve(path: Path, curve: dict | None, fine_tuned: float | None) -> None:
    """k_shot_curve.png: the curve, its best point marked, the fine-tuned score as a horizontal line."""
    if not curve or len(curve.get("points", [])) < 2:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = [p["k"] for p in curve["points"]]
    values = [p["value"] for p in curve["points"]]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(ks, values, marker="o", label=f"prompting ({KIND_WORDS.get(curve['kind'], curve['kind'])})")
    best = curve["best_k"]
    ax.plot([best], [values[ks.index(best)]], marker="*", markersize=14, linestyle="none", label=f"best k={best}")
    if fine_tuned is not None:
        ax.axhline(fine_tuned, color="green", linestyle="--", label="fine-tuned")
    ax.set_xlabel("demonstrations in the prompt (k)")
    ax.set_ylabel(curve["metric"])
    ax.set_xticks(ks)
    ax.legend(loc="best", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
