"""The run registry: every run directory under a folder, read back from the files the run wrote.

A run directory is one that holds config.yaml and run.json (the pipeline writes both before training starts).
Nothing is kept beside the runs: the directories are the registry, so a copied, moved or deleted run needs no
bookkeeping. `tailor runs` lists them; `tailor compare` (compare.py) sets a few side by side.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from tailorlm.errors import TailorError
from tailorlm.eval.baselines import best_prompting
from tailorlm.eval.report import SCALE_100, VARIANT_TITLES, format_metric
from tailorlm.rundir import RunDir
from tailorlm.track.lock import writer_is_gone

SEARCH_DEPTH = 2  # runs/<run>/ and runs/<group>/<run>/ (a sweep's trials, say)


@dataclass
class Headline:
    """One task's headline metric for the fine-tuned model, and its gain over the best prompting variant."""
    metric: str
    fine_tuned: float | None
    best_prompting: float | None
    best_variant: str | None = None  # which prompting result that is (few_shot_likelihood, ...)

    @property
    def gain_points(self) -> float | None:
        if self.fine_tuned is None or self.best_prompting is None:
            return None
        return (self.fine_tuned - self.best_prompting) * (1 if self.metric in SCALE_100 else 100)


@dataclass
class RunRecord:
    """What one run directory says about itself; missing files (a failed run has no metrics.json) read as {}."""
    path: Path
    config: dict
    state: dict  # run.json
    metrics: dict = field(default_factory=dict)
    log: dict = field(default_factory=dict)  # train_log.json

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def status(self) -> str:
        status = self.state.get("status", "unknown")
        # A killed process never rewrites run.json; its lock tells (lock.py).
        return "interrupted" if status == "running" and writer_is_gone(self.path) else status

    @property
    def started(self) -> str:
        return self.state.get("started", "")

    @property
    def task(self) -> str:
        """The run's task names ('classification'; 'topic, sentiment' for a run of two); a run that wrote no
        metrics names them from its config."""
        named = [str(t.get("name")) for t in self.config.get("tasks") or []]
        return ", ".join(self.sections() or named or [(self.config.get("template") or {}).get("preset", "")])

    @property
    def method(self) -> str:
        return (self.config.get("method") or {}).get("name", "")

    @property
    def model(self) -> str:
        return str((self.config.get("model") or {}).get("path", ""))

    @property
    def steps(self) -> int | None:
        if "steps" in self.metrics.get("train", {}):
            return self.metrics["train"]["steps"]
        logged = self.log.get("train_loss") or []
        return logged[-1]["step"] if logged else None  # a failed run: the steps it got through

    @property
    def train_seconds(self) -> float | None:
        return self.metrics.get("train", {}).get("seconds", self.log.get("seconds"))

    def sections(self) -> dict[str, dict]:
        """Task name -> its metrics.json section ({headline, columns, variants}); {} before the run finished."""
        return self.metrics.get("tasks") or {}

    def headlines(self) -> dict[str, Headline]:
        result = {}
        for task, section in self.sections().items():
            metric, variants = section.get("headline"), section.get("variants", {})
            best = best_prompting(variants, metric)  # of any kind: free, constrained, label likelihood
            chosen = (section.get("decoding") or {}).get("chosen", "fine_tuned")  # eval.decoding=auto's choice
            result[task] = Headline(metric, variants.get(chosen, {}).get(metric), best and best["value"],
                                    best and best["variant"])
        return result

    def summary(self) -> dict:
        """One row of `tailor runs --json`."""
        return {"name": self.name, "path": str(self.path), "status": self.status, "started": self.started,
                "task": self.task, "method": self.method, "model": self.model, "steps": self.steps,
                "train_seconds": self.train_seconds, "error": self.state.get("error"),
                "headline": {task: {"metric": h.metric, "fine_tuned": h.fine_tuned,
                                    "best_prompting": h.best_prompting, "best_prompting_variant": h.best_variant,
                                    "gain_points": h.gain_points}
                             for task, h in self.headlines().items()}}


def is_run_dir(path: Path) -> bool:
    return not RunDir(path).started()


def load_run(path: str | Path) -> RunRecord:
    """A run directory's record; a clear error naming the path when it is not one."""
    path = Path(path)
    if not path.is_dir():
        raise TailorError(f"{path}: no such run directory")
    run = RunDir(path)
    missing = run.started()
    if missing:
        raise TailorError(f"{path}: not a run directory (no {' or '.join(missing)})")
    return RunRecord(path, run.raw_config(), run.state(), run.metrics(), run.train_log())


def find_runs(root: str | Path) -> list[RunRecord]:
    """Run directories at root itself, or one or two levels below it, oldest first."""
    root = Path(root)
    if not root.is_dir():
        raise TailorError(f"{root}: no such directory, so no runs to list there (tailor run writes each run into "
                          f"runs/ under the folder it is started from, or where --output says)")
    found: list[Path] = []

    def visit(path: Path, depth: int) -> None:
        if is_run_dir(path):
            found.append(path)  # a run's own subfolders (adapter/, tasks/) are never runs
        elif depth < SEARCH_DEPTH:
            for child in sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")):
                visit(child, depth + 1)

    visit(root, 0)
    records = []
    for path in found:
        try:
            records.append(load_run(path))
        except TailorError as e:  # one damaged run must not hide the others; stderr keeps --json parseable
            print(f"warning: skipped {e}", file=sys.stderr)
    return sorted(records, key=lambda r: (r.started, str(r.path)))


def listing_rows(records: list[RunRecord]) -> list[list[str]]:
    """The cells of `tailor runs`' table, one row per run; the task, metric and gain cells have a line per task."""
    rows = []
    for r in records:
        heads = r.headlines()
        metric = "\n".join(f"{h.metric} {format_metric(h.metric, h.fine_tuned)}" for h in heads.values())
        gain = "\n".join("" if h.gain_points is None else f"{h.gain_points:+.1f} pts" for h in heads.values())
        task = "\n".join(heads) or r.task  # a run without results names its tasks from its config
        rows.append([r.name, r.status, r.started.replace("T", " ")[:19], task, r.method, Path(r.model).name or r.model,
                     _or_dash(r.steps), _or_dash(r.train_seconds, "{:.0f}"), metric or "-", gain])
    return rows


LISTING_HEADER = ["run", "status", "started", "task", "method", "model", "steps", "train s",
                  f"{VARIANT_TITLES['fine_tuned']}", "vs prompting"]
STATUS_STYLE = {"complete": "green", "failed": "red", "interrupted": "yellow", "running": "cyan"}


def print_listing(records: list[RunRecord], root: Path) -> None:
    from rich.table import Table
    from rich.text import Text

    from tailorlm.ui import console

    if not records:
        console.print(f"no runs under {root} (a run directory holds config.yaml and run.json)")
        return
    table = Table(title=f"Runs under {root}: {len(records)}")
    for column in LISTING_HEADER:
        table.add_column(column, justify="right" if column in ("steps", "train s", "vs prompting") else "left")
    for row in listing_rows(records):
        # Text, not markup: a run name with brackets must print as it is.
        table.add_row(*(Text(cell, style=STATUS_STYLE.get(cell, "") if i == 1 else "") for i, cell in enumerate(row)))
    console.print(table)


def _or_dash(value, fmt: str = "{}") -> str:
    return "-" if value is None else fmt.format(value)


