"""What a sweep leaves in its directory, rewritten after every trial so a long sweep can be watched (and a
killed one still has its table): results.md and results.csv (one row per trial), history.png (value per trial,
best so far), importances.png (which parameters mattered, once there are enough trials) and best.yaml (the base
config with the best trial's values, ready for `tailor run best.yaml`)."""
from __future__ import annotations

import csv
import io
import os
import warnings
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

from tailorlm.config import load_config
from tailorlm.rundir import move_into_place, write_text
from tailorlm.sweep.space import FixedParam, SweepSpec
from tailorlm.ui import console

# fANOVA fits a random forest to (params -> value); on fewer trials its importances are noise.
MIN_TRIALS_FOR_IMPORTANCE = 5
STATES = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned", TrialState.FAIL: "failed",
          TrialState.RUNNING: "running", TrialState.WAITING: "waiting"}


def searched_keys(space: SweepSpec) -> list[str]:
    return [key for key, param in space.params.items() if not isinstance(param, FixedParam)]


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return study.best_trial if complete else None


def state_of(trial: FrozenTrial) -> str:
    # A trial failed without an error message was never finished by its worker: it was killed.
    if trial.state == TrialState.FAIL and "error" not in trial.user_attrs:
        return "interrupted"
    return STATES.get(trial.state, trial.state.name.lower())


def trial_rows(study: optuna.Study, keys: list[str]) -> list[dict]:
    best = best_trial(study)
    rows = []
    for trial in study.get_trials(deepcopy=False):
        note = trial.user_attrs.get("error", "")
        if trial.state == TrialState.PRUNED and "pruned_at_step" in trial.user_attrs:
            note = f"stopped at step {trial.user_attrs['pruned_at_step']}"
        if best is not None and trial.number == best.number:
            note = "best"
        rows.append({"trial": trial.number, "state": state_of(trial), **{k: trial.params.get(k, "") for k in keys},
                     "value": trial.value, "seconds": round(trial.duration.total_seconds(), 1) if trial.duration else None,
                     "note": note.splitlines()[0] if note else ""})
    return rows


def write_results(study: optuna.Study, space: SweepSpec, metric: str, sweep_dir: Path, config_path: str,
                  trust_remote_code: bool = False) -> list[Path]:
    keys = searched_keys(space)
    rows = trial_rows(study, keys)
    written = [_write(sweep_dir / "results.csv", _csv(rows, keys)),
               _write(sweep_dir / "results.md", _markdown(study, space, metric, rows, keys, sweep_dir))]
    written += write_plots(study, sweep_dir)
    best = best_trial(study)
    if best is not None:
        cfg = load_config(config_path, best.user_attrs["overrides"], trust_remote_code=trust_remote_code)
        header = (f"# tailor sweep '{study.study_name}': trial {best.number} of {len(rows)}, {metric} {best.value:.6g} "
                  f"on the validation split\n# {' '.join(best.user_attrs['overrides'])}\n")
        written.append(_write(sweep_dir / "best.yaml", header + cfg.to_yaml()))
    return written


def _csv(rows: list[dict], keys: list[str]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, ["trial", "state", *keys, "value", "seconds", "note"], lineterminator="\n")
    writer.writeheader()
    writer.writerows({**r, "value": "" if r["value"] is None else repr(r["value"]),
                      "seconds": "" if r["seconds"] is None else r["seconds"]} for r in rows)
    return out.getvalue()


def _markdown(study, space: SweepSpec, metric: str, rows: list[dict], keys: list[str], sweep_dir: Path) -> str:
    counts = {}
    for row in rows:
        counts[row["state"]] = counts.get(row["state"], 0) + 1
    best = best_trial(study)
    lines = [f"# Sweep: {study.study_name}", "",
             f"- metric: {metric} on the validation split ({study.direction.name.lower()})",
             f"- trials: {len(rows)} of {space.n_trials} (" + ", ".join(f"{n} {s}" for s, n in counts.items()) + ")",
             f"- best: trial {best.number}, {metric} {best.value:.4g} -> best.yaml" if best else "- best: none yet"]
    fixed = [f"{k}={p.value}" for k, p in space.params.items() if isinstance(p, FixedParam)]
    if fixed:
        lines.append(f"- fixed: {', '.join(fixed)}")
    header = ["trial", "state", *keys, metric, "seconds", "note"]
    lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [r["trial"], r["state"], *(_fmt(r[k]) for k in keys), _fmt(r["value"]),
                 "" if r["seconds"] is None else f"{r['seconds']:.0f}", r["note"].replace("|", "\\|")]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    lines += ["", "Trial runs are in trial-<number>/; each one's test split is left for the final run of best.yaml.", ""]
    for image in ("history.png", "importances.png"):
        if (sweep_dir / image).is_file():
            lines += [f"![{image[:-4]}]({image})", ""]
    return "\n".join(lines)


def _fmt(value) -> str:
    if value is None or value == "":
        return ""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def write_plots(study: optuna.Study, sweep_dir: Path) -> list[Path]:
    """history.png always; importances.png once enough trials have completed to say anything."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization.matplotlib import (
        plot_optimization_history,
        plot_param_importances,
    )

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    plots = [("history.png", plot_optimization_history)]
    if len(complete) >= MIN_TRIALS_FOR_IMPORTANCE and any(t.params for t in complete):
        plots.append(("importances.png", plot_param_importances))
    written = []
    for name, plot in plots:
        try:
            with warnings.catch_warnings():  # Optuna marks its matplotlib plots experimental; they are what we want
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                axes = plot(study)
        except (ValueError, RuntimeError) as e:  # e.g. every trial drew the same values: nothing to attribute
            console.print(f"[yellow]{name}: not drawn ({e})[/]")
            continue
        figure = axes.figure
        figure.set_size_inches(8, 4.5)
        figure.tight_layout()
        tmp = sweep_dir / f".{name}.{os.getpid()}.png"
        figure.savefig(tmp, dpi=110)
        plt.close(figure)
        written.append(move_into_place(tmp, sweep_dir / name))
    return written


def _write(path: Path, text: str) -> Path:
    # Workers share the directory: the run directory's write rule names each temporary file by process.
    write_text(path, text)
    return path


def print_results(study: optuna.Study, space: SweepSpec, metric: str) -> None:
    from rich.table import Table

    keys = searched_keys(space)
    table = Table(title=f"Sweep '{study.study_name}': {metric} on the validation split "
                        f"({study.direction.name.lower()})")
    for column in ["trial", "state", *keys, metric, "seconds", "note"]:
        table.add_column(column, justify="right" if column not in ("state", "note") else "left")
    for r in trial_rows(study, keys):
        cells = [str(r["trial"]), r["state"], *(_fmt(r[k]) for k in keys), _fmt(r["value"]),
                 "" if r["seconds"] is None else f"{r['seconds']:.0f}", r["note"]]
        table.add_row(*cells, style="bold green" if r["note"] == "best" else None)
    console.print(table)
