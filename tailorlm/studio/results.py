"""What the studio shows of a run: its live curves, its results and its comparison with others, read from the run
directory's own files (live.jsonl, metrics.json, predictions.jsonl, example_losses.jsonl, train_log.json), the
files `tailor runs` and `tailor compare` read, so a run started from the CLI shows the same way.

Every run folder passed in here has been through paths.Folders (no link out of it); the listing checks each
folder it finds the same way before reading it.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from tailorlm.errors import TailorError
from tailorlm.studio.paths import Folders, Refused
from tailorlm.track.compare import ABSENT
from tailorlm.track.registry import SEARCH_DEPTH, is_run_dir, load_run

AUTO_REPORT = "auto.json"  # what a finished `tailor auto` writes last, beside leaderboard.md
MAX_LEADERBOARD_CHARS = 200_000  # a leaderboard is a page of markdown; more than this is not one tailor wrote
SHOWN_LOSSES = 20  # highest-loss training examples listed
SHOWN_PREDICTIONS = 500


def live_series(run_dir: Path) -> dict[str, list[list[float]]]:
    """live.jsonl as curves: metric -> [[step, value], ...]; a resumed run's repeated steps keep the later value."""
    series: dict[str, dict[int, float]] = {}
    for row in _jsonl(run_dir / "live.jsonl"):
        step = row.get("step")
        for key, value in row.items():
            if key not in ("step", "time") and isinstance(value, (int, float)) and isinstance(step, int):
                series.setdefault(key, {})[step] = value
    return {key: sorted([s, v] for s, v in points.items()) for key, points in series.items()}


def is_auto_folder(path: Path) -> bool:
    """A finished auto search's folder (one still searching is known by the studio that started it)."""
    return (path / AUTO_REPORT).is_file()


def auto_summary(folder: Path, name: str) -> dict:
    """An auto search as the studio shows it: its leaderboard once written, and its winner as a run of the
    group (NAME/trial-N), which the results, chat and export pages open like any run."""
    report = folder / "leaderboard.md"
    text = report.read_text(encoding="utf-8", errors="replace")[:MAX_LEADERBOARD_CHARS] if report.is_file() else ""
    try:
        winner = (json.loads((folder / AUTO_REPORT).read_text(encoding="utf-8")) or {}).get("winner") or {}
    except (OSError, ValueError, AttributeError):  # not written yet, or not as auto writes it
        winner = {}
    run_dir = winner.get("run_dir") if isinstance(winner, dict) else None
    return {"kind": "auto", "leaderboard": text, "winner": f"{name}/{Path(str(run_dir)).name}" if run_dir else None,
            "winner_key": winner.get("key") if isinstance(winner, dict) else None}


def run_listing(folders: Folders) -> list[dict]:
    """The runs `tailor runs` would list, oldest first, named as the studio opens them (GROUP/NAME for a run of
    a group), and each auto search (its winner as the headline). A run folder that holds a link out of itself,
    or that is a link out of the runs folder, is listed as refused (with the reason) and not read; one whose
    files are damaged is listed as unreadable."""
    rows = [_auto_row(path) for path in sorted(folders.runs.iterdir())
            if path.is_dir() and not path.is_symlink() and is_auto_folder(path)]
    for path in _run_folders(folders.runs):
        try:
            if not _inside(path, folders.runs):
                raise Refused(f"{path.name}: refused: it is a symbolic link leading out of {folders.runs}")
            folders.check_run_folder(path.resolve(), path.name)
            record = load_run(path)
        except Refused as e:
            rows.append(_unread(path, "refused", e))
            continue
        except TailorError as e:
            rows.append(_unread(path, "unreadable", e))
            continue
        heads = [f"{h.metric} {h.fine_tuned:.3f}" + (f" vs {h.best_prompting:.3f} prompting" if h.best_prompting
                                                       is not None else "")
                 for h in record.headlines().values() if h.fine_tuned is not None]
        rows.append({"name": path.relative_to(folders.runs).as_posix(), "status": record.status, "started": record.started,
                     "method": record.method, "headline": "; ".join(heads)})
    return sorted(rows, key=lambda row: (row["started"], row["name"]))


def run_results(run_dir: Path) -> dict:
    """The results page: status, the variants table, confusion matrix, predictions, highest-loss examples."""
    record = load_run(run_dir)
    metrics = record.metrics
    tables = []
    for task, section in record.sections().items():
        columns = [c for c in section.get("columns", []) if c != "valid"] + ["valid"]
        rows = [{"variant": name, **{c: values.get(c) for c in columns}, "kind": values.get("kind"),
                 "k": values.get("k")} for name, values in section.get("variants", {}).items()]
        tuned = section.get("variants", {}).get("fine_tuned", {})
        tables.append({"task": task, "headline": section.get("headline"), "columns": columns, "rows": rows,
                       "best_prompting": section.get("best_prompting"), "labels": section.get("labels") or [],
                       "confusion": tuned.get("confusion")})
    predictions = [p for p in _jsonl(run_dir / "predictions.jsonl") if p.get("variant") == "fine_tuned"]
    for p in predictions:
        p["correct"] = p.get("predicted") == p.get("expected") if p.get("expected") is not None else None
    losses = sorted(_jsonl(run_dir / "example_losses.jsonl"), key=lambda r: -float(r.get("loss", 0)))
    log = record.log
    return {"name": record.name, "status": record.status, "tables": tables,
            "predictions": predictions[:SHOWN_PREDICTIONS], "losses": losses[:SHOWN_LOSSES],
            "retention": log.get("retention"), "best_step": log.get("best_step"),
            "stopped_early": log.get("stopped_early"), "train_seconds": log.get("seconds"),
            "config": (run_dir / "config.yaml").read_text(encoding="utf-8") if (run_dir / "config.yaml").is_file() else ""}


def comparison(paths: list[Path]) -> dict:
    """What `tailor compare` computes (ops/compare.py), as data: the settings that differ, the metrics side by side,
    the curves."""
    from tailorlm.ops.compare import compare

    found = compare(paths)
    return {"labels": found.labels, "config_diff": {k: [_plain(v) for v in vs] for k, vs in found.config_diff.items()},
            "metrics": found.metrics, "curves": found.curves}


def _run_folders(runs: Path) -> list[Path]:
    """Run folders at runs/<run>/ and runs/<group>/<run>/, as registry.find_runs finds them (which reads each
    one it finds, so the studio finds them here and checks each before reading)."""
    found: list[Path] = []

    def visit(path: Path, depth: int) -> None:
        if depth and is_run_dir(path):
            found.append(path)  # listed, as refused when it is a link out of the runs folder
        elif depth < SEARCH_DEPTH and (depth == 0 or _inside(path, runs)):  # a linked group is not entered
            for child in sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")):
                visit(child, depth + 1)

    visit(runs, 0)
    return found


def _auto_row(path: Path) -> dict:
    summary = auto_summary(path, path.name)
    started = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(path.stat().st_mtime))
    return {"name": path.name, "status": "complete", "started": started, "method": "auto",
            "headline": f"winner: {summary['winner_key']} ({summary['winner']})" if summary["winner"] else ""}


def _inside(path: Path, runs: Path) -> bool:
    return runs in path.resolve().parents


def _unread(path: Path, status: str, error: TailorError) -> dict:
    return {"name": path.name, "status": status, "started": "", "method": "", "headline": "", "error": str(error)}


def _plain(value):
    """A compared setting as JSON: a key a run's config lacks is null, as compare.json writes it."""
    if value is ABSENT:
        return None
    return value if isinstance(value, (str, int, float, bool, list, dict)) or value is None else str(value)


def _jsonl(path: Path) -> list[dict]:
    """A JSONL file's rows; a line still being written (the last one of a live file) is skipped."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows
