"""The Optuna study behind a sweep: one storage (SQLite in the sweep directory by default) that every run of the
same command, and every worker started beside it, shares. Re-running the command resumes the study; the trial
count is the study's total, so `--trials 20` means 20 trials whatever the number of runs or workers."""
from __future__ import annotations

import fcntl
import os
import socket
from contextlib import contextmanager
from pathlib import Path

import optuna
from optuna.storages import RDBStorage
from optuna.trial import TrialState
from sqlalchemy.exc import ArgumentError

from tailorlm.errors import TailorError
from tailorlm.sweep.space import PrunerSpec, SweepSpec
from tailorlm.ui import console

# Workers wait this long for SQLite's write lock instead of failing with 'database is locked'.
SQLITE_TIMEOUT_S = 60


def storage_url(space: SweepSpec, sweep_dir: Path, override: str | None = None) -> str:
    return override or space.storage or f"sqlite:///{(sweep_dir / 'study.db').resolve()}"


def make_sampler(space: SweepSpec, seed: int) -> optuna.samplers.BaseSampler:
    if space.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    # constant_liar: a trial still running counts as a poor one, so parallel workers spread out instead of all
    # sampling next to the same promising point.
    return optuna.samplers.TPESampler(seed=seed, constant_liar=True)


def make_pruner(spec: PrunerSpec) -> optuna.pruners.BasePruner:
    if spec.name == "none":
        return optuna.pruners.NopPruner()
    if spec.name == "threshold":
        return optuna.pruners.ThresholdPruner(lower=spec.lower, upper=spec.upper, n_warmup_steps=spec.n_warmup_steps)
    if spec.name == "percentile":
        return optuna.pruners.PercentilePruner(spec.percentile, n_startup_trials=spec.n_startup_trials,
                                               n_warmup_steps=spec.n_warmup_steps)
    return optuna.pruners.MedianPruner(n_startup_trials=spec.n_startup_trials, n_warmup_steps=spec.n_warmup_steps)


def open_study(url: str, name: str, space: SweepSpec, metric: str, direction: str) -> optuna.Study:
    """Create the study, or load it when it exists (a resumed sweep, or another worker got there first)."""
    engine_kwargs = {"connect_args": {"timeout": SQLITE_TIMEOUT_S}} if url.startswith("sqlite") else {}
    try:
        with _first_one_creates(url):
            storage = RDBStorage(url, engine_kwargs=engine_kwargs)
            study = optuna.create_study(storage=storage, study_name=name, direction=direction, load_if_exists=True,
                                        sampler=make_sampler(space, space.seed), pruner=make_pruner(space.pruner))
    except (ImportError, ValueError, ArgumentError) as e:  # an unknown scheme, a driver not installed, a bad URL
        raise TailorError(f"storage {url}: {e}") from None
    # Values measured on another metric, or optimised the other way, would not be comparable: refuse to mix.
    recorded = study.user_attrs.get("metric")
    if recorded is None:
        study.set_user_attr("metric", metric)
    elif recorded != metric:
        raise TailorError(f"study '{name}' in {url} optimises {recorded}, not {metric}; set metric: {recorded} "
                          f"or start another study (--study NAME)")
    if study.direction.name.lower() != direction:
        raise TailorError(f"study '{name}' in {url} is set to {study.direction.name.lower()}, not {direction}")
    return study


@contextmanager
def _first_one_creates(url: str):
    """Workers started together on a new SQLite file would race to create its tables and schema version (and
    fail with 'table already exists'): an exclusive lock beside the file lets one create, the others then load."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError:  # left to RDBStorage, which reports it
        parsed = None
    if parsed is None or not parsed.drivername.startswith("sqlite") or parsed.database in (None, "", ":memory:"):
        yield
        return
    lock_path = Path(parsed.database).with_name(Path(parsed.database).name + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or when the process dies
        yield


def fail_interrupted(study: optuna.Study) -> list[int]:
    """Trials left 'running' by a worker of this machine that no longer exists (killed, or the machine rebooted)
    are marked failed, so they neither count as running forever nor block the results."""
    host, failed = socket.gethostname(), []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        pid = trial.user_attrs.get("pid")
        if trial.user_attrs.get("host") == host and pid is not None and not _alive(pid):
            study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
            failed.append(trial.number)
    if failed:
        console.print(f"[yellow]Marked interrupted trial(s) {', '.join(map(str, failed))} as failed "
                      f"(their worker process is gone)[/]")
    return failed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    return True


def run_trials(study: optuna.Study, objective, n_trials: int, after_each=None) -> None:
    """Run trials until the study holds n_trials in all (any state, counting other workers' running ones).
    A trial that fails on a TailorError (or runs out of GPU memory) is recorded and the sweep goes on."""
    remaining = n_trials - len(study.get_trials(deepcopy=False))
    if remaining <= 0:
        console.print(f"The study already holds {len(study.trials)} of {n_trials} trials; nothing to run "
                      f"(raise --trials to run more)")
        return
    console.print(f"Running up to {remaining} trial(s); the study holds {n_trials - remaining} of {n_trials}")
    # MaxTrialsCallback stops this worker once the study's total (all states, other workers' included) is reached;
    # n_trials=remaining bounds this worker alone when it runs by itself.
    callbacks = [optuna.study.MaxTrialsCallback(n_trials, states=None)] + ([after_each] if after_each else [])
    import torch

    study.optimize(objective, n_trials=remaining, catch=(TailorError, torch.cuda.OutOfMemoryError),
                   callbacks=callbacks, gc_after_trial=True)
