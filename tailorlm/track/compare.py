"""`tailor compare`: runs side by side. Which config keys differ, every metric of every variant, training facts,
and the logged curves overlaid, printed and saved as compare.md, compare.json and curves.png.

Runs need not share a task: rows are the union of what the runs logged, and a run without a value shows '-'.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from rich.table import Table
from rich.text import Text

from tailorlm.errors import TailorError
from tailorlm.eval.report import TITLES, format_metric, variant_title
from tailorlm.rundir import write_json
from tailorlm.track.flat import as_text, flatten
from tailorlm.track.registry import RunRecord, load_run
from tailorlm.ui import console

ABSENT = object()  # a config key a run does not have (an older version's config), unlike an explicit null
VARIANT_ORDER = [f"{base}{kind}" for base in ("zero_shot", "few_shot") for kind in ("", "_constrained", "_likelihood")] + [
    "majority", "classic", "fine_tuned", "fine_tuned_constrained", "vs prompting"]  # rows in this order, whichever run has them
NOT_CURVE_FIELDS = {"step", "epoch"}  # x positions, not values to plot
METRICS_TITLE = "Metrics (test split, on generated text)"
NUMERIC_TABLES = {METRICS_TITLE, "Training"}
CELL_CHARS = 60  # long values (templates, paths) are cut in the tables; compare.json keeps them whole


@dataclass
class Comparison:
    labels: list[str]  # one per run, unique, in the order given
    runs: list[RunRecord]
    config_diff: dict[str, list]  # dotted key -> value per run (ABSENT where a run lacks it)
    metrics: list[dict]  # {task, variant, metric, values: [value per run or None]}
    training: dict[str, list]  # fact -> value per run
    curves: dict[str, dict[str, list[list[float]]]]  # curve -> run label -> [[step, value], ...]


def compare_runs(paths: list[str | Path]) -> Comparison:
    if len(paths) < 2:
        raise TailorError("tailor compare needs at least two run directories")
    twice = [p for i, p in enumerate(paths) if Path(p).resolve() in [Path(q).resolve() for q in paths[:i]]]
    if twice:
        raise TailorError(f"{twice[0]}: given more than once")
    runs = [load_run(p) for p in paths]
    names = [r.name for r in runs]
    labels = [r.name if names.count(r.name) == 1 else str(r.path) for r in runs]
    return Comparison(labels, runs, config_differences(runs), metric_rows(runs), training_facts(runs),
                      curves(runs, labels))


def config_differences(runs: list[RunRecord]) -> dict[str, list]:
    flats = [flatten(r.config) for r in runs]
    keys = list(dict.fromkeys(k for flat in flats for k in flat))  # first run's order, then new keys
    diff = {}
    for key in keys:
        values = [flat.get(key, ABSENT) for flat in flats]
        if any(v != values[0] for v in values[1:]):
            diff[key] = values
    return diff


def metric_rows(runs: list[RunRecord]) -> list[dict]:
    """Every numeric metric of every variant of every task, plus each task's fine-tuned gain in points."""
    cells: dict[tuple[str, str, str], list] = {}
    for i, run in enumerate(runs):
        for task, section in run.sections().items():
            for variant, values in section.get("variants", {}).items():
                ordered = list(section.get("columns", [])) + [k for k in values if k not in section.get("columns", [])]
                for metric in ordered:
                    value = values.get(metric)
                    if metric != "n" and isinstance(value, (int, float)) and not isinstance(value, bool):
                        cells.setdefault((task, variant, metric), [None] * len(runs))[i] = value
            headline = run.headlines()[task]
            if headline.gain_points is not None:
                key = (task, "vs prompting", f"{headline.metric} (pts)")
                cells.setdefault(key, [None] * len(runs))[i] = round(headline.gain_points, 2)
    tasks = list(dict.fromkeys(t for t, _, _ in cells))
    rank = {v: i for i, v in enumerate(VARIANT_ORDER)}
    order = sorted(enumerate(cells), key=lambda item: (tasks.index(item[1][0]), rank.get(item[1][1], len(rank)), item[0]))
    return [{"task": t, "variant": v, "metric": m, "values": cells[(t, v, m)]} for _, (t, v, m) in order]


def training_facts(runs: list[RunRecord]) -> dict[str, list]:
    """Status and timing, then every figure metrics.json keeps under `train` (whatever this version records:
    steps, seconds, tokens, best step, retention...), then rates derived from them. A failed run has no
    metrics.json: its steps, seconds and tokens come from train_log.json."""
    def facts(run: RunRecord) -> tuple[dict, dict, dict]:
        train = {"steps": run.steps, "seconds": run.train_seconds, "step_seconds": run.log.get("step_seconds"),
                 "tokens": run.log.get("tokens"), **(run.metrics.get("train") or {})}
        flat = {f"train {k}": v for k, v in flatten(train).items() if not isinstance(v, (list, dict))}
        # tokens/s over the steps alone where recorded (runs before step_seconds existed: the whole phase)
        seconds, tokens = train.get("step_seconds") or train.get("seconds"), train.get("tokens")
        val = [r["loss"] for r in run.log.get("val_loss", []) if _is_number(r.get("loss"))]
        head = {"status": run.status, "started": run.started, "run seconds": run.state.get("seconds")}
        tail = {"tokens/s": round(tokens / seconds) if tokens and seconds else None,
                "best val loss": min(val) if val else None,
                "test examples": sum(s.get("n_test", 0) for s in run.sections().values()) or None}
        return head, flat, tail

    per_run = [facts(r) for r in runs]
    merged = [{**head, **flat, **tail} for head, flat, tail in per_run]
    keys = dict.fromkeys(k for part in range(3) for parts in per_run for k in parts[part])  # head, train, tail
    return {key: [m.get(key) for m in merged] for key in keys}


def curves(runs: list[RunRecord], labels: list[str]) -> dict[str, dict[str, list[list[float]]]]:
    """Every list of {step, ...} records in train_log.json (train_loss, val_loss, and whatever later versions
    add: val_metrics, retention), one curve per numeric field: 'val_loss', 'train_loss/lr', 'val_metrics/accuracy'."""
    result: dict[str, dict[str, list[list[float]]]] = {}
    for run, label in zip(runs, labels):
        for key, records in run.log.items():
            if not (isinstance(records, list) and records and all(isinstance(r, dict) and "step" in r for r in records)):
                continue
            for field_name in dict.fromkeys(f for r in records for f in r if f not in NOT_CURVE_FIELDS):
                points = [[r["step"], r[field_name]] for r in records if _is_number(r.get(field_name))]
                if points:
                    name = key if field_name == "loss" else f"{key}/{field_name}"
                    result.setdefault(name, {})[label] = points
    return result


def write_comparison(comparison: Comparison, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    if comparison.curves:
        written.append(plot_curves(comparison, out_dir / "curves.png"))
    (out_dir / "compare.md").write_text(markdown(comparison, [p.name for p in written]))
    write_json(out_dir / "compare.json", {
        "runs": [{"label": label, "path": str(r.path), "status": r.status} for label, r in zip(comparison.labels, comparison.runs)],
        "config_diff": {k: [None if v is ABSENT else v for v in vs] for k, vs in comparison.config_diff.items()},
        "metrics": comparison.metrics, "training": comparison.training, "curves": comparison.curves})
    return [out_dir / "compare.md", out_dir / "compare.json", *written]


def plot_curves(comparison: Comparison, path: Path) -> Path:
    """One panel per curve, one line per run, so a run's panels share its colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    names = list(comparison.curves)
    cols = min(2, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, 3.6 * rows), squeeze=False)
    colours = {label: f"C{i}" for i, label in enumerate(comparison.labels)}
    for ax, name in zip(axes.flat, names):
        for label, points in comparison.curves[name].items():
            steps, values = zip(*points)
            ax.plot(steps, values, "o-" if len(points) <= 25 else "-", markersize=3, label=label, color=colours[label])
        ax.set_title(name)
        ax.set_xlabel("optimizer step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(names):]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def tables(comparison: Comparison) -> dict[str, tuple[list[str], list[list[str]]]]:
    """The comparison as titled tables of text cells, shared by the terminal and compare.md (NUMERIC_TABLES:
    the run columns hold figures, right-aligned in the terminal)."""
    labels = comparison.labels
    config = (["key", *labels], [[k, *(_cell(v) for v in vs)] for k, vs in comparison.config_diff.items()])
    metrics = (["task", "variant", "metric", *labels],
               [[m["task"], variant_title(m["variant"]), TITLES.get(m["metric"], m["metric"]),
                 *(_metric_cell(m["metric"], v) for v in m["values"])] for m in comparison.metrics])
    training = (["", *labels], [[fact, *(_cell(v, none="-") for v in vs)] for fact, vs in comparison.training.items()])
    runs = (["run", "path"], [[label, str(r.path)] for label, r in zip(labels, comparison.runs)])
    return {"Runs": runs, "Config differences": config, METRICS_TITLE: metrics, "Training": training}


def markdown(comparison: Comparison, images: list[str]) -> str:
    lines = [f"# Comparing {len(comparison.runs)} runs: {', '.join(comparison.labels)}"]
    for title, (header, rows) in tables(comparison).items():
        lines += ["", f"## {title}", ""]
        if not rows:
            lines.append("(none)" if title != "Config differences" else "The configs are identical.")
            continue
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    if images:
        lines += ["", "## Curves", ""] + [f"![{name}]({name})" for name in images]
    return "\n".join(lines) + "\n"


def print_comparison(comparison: Comparison) -> None:
    for title, (header, rows) in tables(comparison).items():
        if not rows:
            console.print(f"[bold]{title}:[/] " + ("identical" if title == "Config differences" else "none"))
            continue
        table = Table(title=title, title_justify="left")
        for i, column in enumerate(header):
            numeric = title in NUMERIC_TABLES and i >= len(header) - len(comparison.labels)
            table.add_column(column, justify="right" if numeric else "left")
        for row in rows:
            table.add_row(*map(Text, row))  # Text: config values may hold brackets rich would read as markup
        console.print(table)


def _cell(value, none: str = "null") -> str:
    if value is ABSENT:
        return "(absent)"
    if value is None:
        return none
    if isinstance(value, float):
        text = f"{value:.6g}"
    else:
        text = as_text(value).replace("\n", "\\n")
    return text if len(text) <= CELL_CHARS else text[: CELL_CHARS - 3] + "..."


def _metric_cell(metric: str, value) -> str:
    if value is None:
        return "-"
    return f"{value:+.1f}" if metric.endswith("(pts)") else format_metric(metric, value)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
