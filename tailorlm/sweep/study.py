"""The Optuna study behind a sweep: one storage (SQLite in the sweep directory by default) that every run of the
same command, and every worker started beside it, shares. Re-running the command resumes the study; the trial
count is the study's total, so `--trials 20` means 20 trials whatever the number of runs or workers: each worker
reserves its next trial under a lock that all of them take, so the total holds exactly."""
from __future__ import annotations

import gc
import os
import socket
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import optuna
import sqlalchemy
from filelock import UnixFileLock
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from tailorlm.errors import TailorError
from tailorlm.sweep.space import PrunerSpec, SweepSpec
from tailorlm.ui import console

# Workers wait this long for SQLite's write lock instead of failing with 'database is locked'.
SQLITE_TIMEOUT_S = 60


def storage_url(space: SweepSpec | None, sweep_dir: Path, override: str | None = None) -> str:
    """The study's database: the command line's, the space's, else study.db in the folder (space None: a
    search with no space of its own, tailor auto's)."""
    return override or (space.storage if space else None) or f"sqlite:///{(sweep_dir / 'study.db').resolve()}"


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


def open_study(url: str, name: str, space: SweepSpec | None, metric: str, direction: str) -> optuna.Study:
    """Create the study, or load it when it exists (a resumed sweep, or another worker got there first). With
    no space (tailor auto, which proposes its own trials) the study samples nothing, so it gets no sampler or
    pruner of ours."""
    engine_kwargs = {"connect_args": {"timeout": SQLITE_TIMEOUT_S}} if _is_sqlite(url) else {}
    try:
        with _sqlite_file_lock(url):
            storage = RDBStorage(url, engine_kwargs=engine_kwargs)
            study = optuna.create_study(storage=storage, study_name=name, direction=direction, load_if_exists=True,
                                        sampler=make_sampler(space, space.seed) if space else None,
                                        pruner=make_pruner(space.pruner) if space else None)
    except (ImportError, ValueError, ArgumentError) as e:  # an unknown scheme, a driver not installed, a bad URL
        raise TailorError(f"storage {url}: {e}") from None
    # Values measured on another metric, or optimised the other way, would not be comparable: refuse to mix.
    recorded = pin(study, "metric", metric)
    if recorded != metric:
        raise TailorError(f"study '{name}' in {url} optimises {recorded}, not {metric}; set metric: {recorded} "
                          f"or start another study (--study NAME)")
    if study.direction.name.lower() != direction:
        raise TailorError(f"study '{name}' in {url} is set to {study.direction.name.lower()}, not {direction}")
    return study


def pin(study: optuna.Study, key: str, value):
    """The study's value of `key`, recorded as `value` by the first run that opens it: later runs compare theirs
    with what this returns, so trials measured under different settings are never mixed."""
    if key not in study.user_attrs:
        study.set_user_attr(key, value)
        return value
    return study.user_attrs[key]


def _sqlite_file(url: str) -> Path | None:
    """The database file of an SQLite URL; None for an in-memory database, any other storage, or a bad URL
    (left to RDBStorage, which reports it)."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        return None
    if not parsed.drivername.startswith("sqlite") or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database)


def _is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


@contextmanager
def _sqlite_file_lock(url: str):
    """An exclusive lock on a file beside an SQLite database; a no-op for any other storage.

    Workers started together on a new SQLite file would race to create its tables and schema version (and fail
    with 'table already exists'): under this lock one creates, the others then load. Workers also reserve trials
    under it (reserve_trial). A file lock rather than SQLite's own: SQLite takes its write lock only at a
    statement that writes, too late to cover the count that comes before it."""
    database = _sqlite_file(url)
    if database is None:
        yield
        return
    lock_path = database.with_name(database.name + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    # flock, waited for without limit; released at the end of the block, or by the kernel when the process dies
    # (never a marker file, which a killed worker would leave behind to block the others)
    with UnixFileLock(lock_path, thread_local=False, fallback_to_soft=False):
        yield


@contextmanager
def _study_row_lock(url: str, study_name: str):
    """On a database server, where workers may be on several machines that no file lock reaches: the study's
    'metric' attribute row, held FOR UPDATE until the block ends, so a second worker waits at this select. That
    row because open_study always writes it and Optuna never locks it; Optuna locks the study's own row while it
    creates a trial, so holding that one here would deadlock our own ask()."""
    attrs = sqlalchemy.table("study_user_attributes", sqlalchemy.column("study_id"), sqlalchemy.column("key"))
    studies = sqlalchemy.table("studies", sqlalchemy.column("study_id"), sqlalchemy.column("study_name"))
    this_study = sqlalchemy.select(studies.c.study_id).where(studies.c.study_name == study_name).scalar_subquery()
    metric_row = sqlalchemy.select(attrs.c.study_id).where(attrs.c.study_id == this_study, attrs.c.key == "metric")
    with _server_engine(url).begin() as connection:
        if connection.execute(metric_row.with_for_update()).first() is None:
            raise TailorError(f"study '{study_name}' in {url} has no 'metric' attribute (a sweep writes it when it "
                              f"opens the study), so its workers cannot take turns")
        yield


@lru_cache(maxsize=None)
def _server_engine(url: str) -> sqlalchemy.Engine:
    # One engine (one connection pool) per storage for the whole sweep, beside Optuna's own.
    return sqlalchemy.create_engine(url)


@contextmanager
def study_lock(url: str, study_name: str):
    """The lock every worker of a study takes to count and create trials: a file lock beside an SQLite database,
    the study's row on a database server."""
    with _sqlite_file_lock(url) if _is_sqlite(url) else _study_row_lock(url, study_name):
        yield


def reserve_trial(study: optuna.Study, url: str, n_trials: int) -> optuna.Trial | None:
    """Start the study's next trial, or return None once the study holds n_trials (any state).

    Counting and creating happen under one lock that every worker takes: a worker that counted first and asked
    later could find another worker had done the same in between, and both would start the last trial.
    (An in-memory SQLite study lives in one process: nothing else can add to it.)"""
    with study_lock(url, study.study_name):
        if len(study.get_trials(deepcopy=False)) >= n_trials:
            return None
        return study.ask()


def fail_interrupted(study: optuna.Study) -> list[int]:
    """Trials left 'running' by a worker of this machine that no longer exists (killed, or the machine rebooted)
    are marked failed, so they neither count as running forever nor block the results."""
    host, failed = socket.gethostname(), []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        pid = trial.user_attrs.get("pid")
        if trial.user_attrs.get("host") == host and pid is not None and not worker_alive(pid):
            study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
            failed.append(trial.number)
    if failed:
        console.print(f"[yellow]Marked interrupted trial(s) {', '.join(map(str, failed))} as failed "
                      f"(their worker process is gone)[/]")
    return failed


def worker_alive(pid: int) -> bool:
    """Whether a worker process of this machine still exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    return True


def run_trials(study: optuna.Study, url: str, objective, n_trials: int, after_each=None) -> None:
    """Run trials until the study holds n_trials in all (any state: failed and interrupted trials count, and so do
    other workers' running ones). A trial that fails on a TailorError (or runs out of GPU memory) is recorded and
    the sweep goes on. after_each(study, trial) is called with each finished trial."""
    held = len(study.get_trials(deepcopy=False))
    if held >= n_trials:
        console.print(f"The study already holds {held} of {n_trials} trials; nothing to run "
                      f"(raise --trials to run more)")
        return
    console.print(f"Running up to {n_trials - held} trial(s); the study holds {held} of {n_trials}")
    import torch

    recoverable = (TailorError, torch.cuda.OutOfMemoryError)
    while (trial := reserve_trial(study, url, n_trials)) is not None:
        finished = _run_one(study, objective, trial, recoverable)
        gc.collect()  # the trial's model and optimizer go now, not when the next trial is already loading its own
        if after_each:
            after_each(study, finished)


def _run_one(study: optuna.Study, objective, trial: optuna.Trial, recoverable: tuple) -> FrozenTrial:
    """Run one reserved trial and record how it ended, as Optuna's optimize() does: pruned (with its last
    reported value), failed, or complete with the objective's value."""
    try:
        value = objective(trial)
    except optuna.TrialPruned:
        return study.tell(trial, state=TrialState.PRUNED)
    except recoverable:
        return study.tell(trial, state=TrialState.FAIL)
    except BaseException:  # Ctrl-C or a bug: the trial is recorded as failed, and the sweep stops
        study.tell(trial, state=TrialState.FAIL)
        raise
    return study.tell(trial, value)
