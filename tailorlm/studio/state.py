"""The studio's server-side state: the draft config the forms edit, the run queue, chats and exports.

State lives here, not in the browser, so a refresh or a second tab shows the same draft, the same queue and the
same live run. The draft is saved to the studio's home on every change, so restarting the studio keeps it.

Every setting that names a file is checked wherever it sits in the draft (`data.train`, `{"data": {"train": ..}}`,
`tasks[i].data.train`, `eval.retention.data`), when the draft changes and again each time it is used (the
template preview, the start of a run), since the studio may have restarted with other folders since.
"""
from __future__ import annotations

import copy
import json
import math
import threading
import time
from pathlib import Path
from typing import Callable

import yaml

from tailorlm.config import RunConfig, load_config
from tailorlm.errors import TailorError
from tailorlm.rundir import write_json, write_text
from tailorlm.studio.paths import RUN_NAME, Folders, Missing, Refused
from tailorlm.studio.queue import RunQueue
from tailorlm.studio.results import is_auto_folder

# The studio's starting draft: a classification table, small enough to train in minutes on a CPU.
STARTING_DRAFT = {"template": {"preset": "classification"}, "output": {"name": "studio"}}

# Settings that name a file or folder to read, by the last two keys of their place in the settings (list
# indices dropped): tasks[i].data.train ends in data.train too. config/sections.py has no other path setting.
PATH_SETTINGS = {("data", "train"), ("data", "validation"), ("data", "test"), ("model", "path"),
                 ("retention", "data")}
BUILTIN_DATA = "builtin:"  # a dataset shipped in the package, looked up by name: no file is named
DEFAULT_MODEL = "default"


def auto_budget_file(config: Path) -> Path:
    """Beside an auto search's saved config, the budget it was started with."""
    return config.with_suffix(".budget")


class AlreadyQueued(TailorError):
    """Start pressed again on a draft that is already queued or running; the studio answers 409."""

    http_status = 409

    def __init__(self, state: str, name: str):
        super().__init__(f"this draft is already {state} as {name}; stop it or change a setting first")
        self.details = {"run": name}


class Draft:
    """The config the forms build, as the nested settings a YAML file would hold (defaults left out).
    `check` turns settings into checked settings (file paths resolved) or raises; nothing it refuses is kept."""

    def __init__(self, path: Path, check: Callable[[dict], dict] = copy.deepcopy):
        self.path = path
        self.check = check
        self.settings = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else copy.deepcopy(STARTING_DRAFT)
        self._lock = threading.Lock()

    def update(self, changes: dict, removals: list[str] = ()) -> None:
        """Set dotted keys (None or '' removes one, back to the default), check the result, then keep and save it."""
        with self._lock:
            settings = copy.deepcopy(self.settings)
            for key in removals:
                _remove(settings, key.split("."))
            for key, value in changes.items():
                parts = key.split(".")
                if value is None or value == "":
                    _remove(settings, parts)
                else:
                    node = settings
                    for part in parts[:-1]:
                        if not isinstance(node.get(part), dict):
                            node[part] = {}
                        node = node[part]
                    node[parts[-1]] = value
            self.settings = self.check(settings)
            write_json(self.path, self.settings)

    def yaml(self) -> str:
        return _yaml(self.settings)

    def checked_yaml(self) -> str:
        """The YAML a run starts from: the draft checked again now (a saved draft may predate these folders)."""
        return _yaml(self.check(copy.deepcopy(self.settings)))

    def config(self) -> RunConfig:
        """The draft validated as `tailor run` validates a file (ConfigError names the setting)."""
        return load_config(None, [], text=self.checked_yaml(), source="the studio's settings")


class Studio:
    def __init__(self, folders: Folders, token: str | None = None):
        self.folders = folders
        self.token = token
        self.draft = Draft(folders.home / "draft.json", lambda settings: checked_settings(settings, folders))
        self.queue = RunQueue()
        self.chats: dict[str, object] = {}
        self.chat_lock = threading.Lock()
        self.exports: dict[str, dict] = {}
        self._start_lock = threading.Lock()  # two quick presses of Start: the second sees the first's job

    def start_run(self, budget: str | None = None) -> dict:
        """Queue the draft as a run: its YAML saved under configs/, its folder under the runs folder. With a
        budget, an auto search instead (`tailor auto`: the model and the recipe keys the draft leaves blank are
        chosen on validation within the budget), its folder under the runs folder and its trials in that
        folder. The same YAML already queued or running is refused (AlreadyQueued), so Start pressed twice
        trains once."""
        if budget is not None:
            from tailorlm.auto.plan import parse_budget

            parse_budget(budget, "the auto search's budget")  # a budget auto cannot read is refused now, not when the search starts
        with self._start_lock:
            text = self.draft.checked_yaml()
            cfg = load_config(None, [], text=text, source="the studio's settings")
            for job in self.queue.active():
                if not job.resume and job.config.is_file() and job.config.read_text(encoding="utf-8") == text:
                    raise AlreadyQueued(job.state, job.name)
            stem = self.folders.check_run_name(cfg.output.name) + ("-auto" if budget else "")
            name = f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
            while (self.folders.runs / name).exists() or self.queue.get(name):
                name += "x"
            run_dir = self.folders.run_dir(name)
            config = self.folders.own_file(self.folders.home / "configs" / f"{name}.yaml")
            write_text(config, text)
            if budget:  # kept for Resume, which runs the same search again
                write_text(self.folders.own_file(auto_budget_file(config)), budget)
            job = self.queue.submit(name, config, run_dir, self.folders.log_file(name), budget=budget)
            return job.public()

    def is_auto(self, name: str, path: Path) -> bool:
        """Whether run `name` is an auto search: one this studio started (its budget is kept beside its
        config), or a finished one from anywhere."""
        saved = self.folders.home / "configs" / f"{name}.yaml"
        return "/" not in name and (auto_budget_file(saved).is_file() or is_auto_folder(path))

    def started_run(self, name: str) -> Path:
        """The folder of run `name`, which must exist (Missing, a 404, for a queued run or an unknown name)."""
        path = self.folders.run_dir(name)
        if not path.is_dir():
            if self.queue.get(name) is not None:
                raise Missing(f"{name} has not started: it has no run folder yet")
            raise Missing(f"{name}: no such run in {self.folders.runs}")
        return path

    def resume_run(self, name: str, run_dir: Path) -> dict:
        """Queue an interrupted run (from the studio or the CLI) to continue from its latest checkpoint, or an
        interrupted auto search of this studio to go on (it reads its finished trials back)."""
        from tailorlm.track.registry import load_run

        if "/" in name:
            raise TailorError(f"{name} is a trial of a search: run the search again (the same tailor sweep or tailor "
                              f"auto command) and it goes on where it stopped")
        config = self.folders.home / "configs" / f"{name}.yaml"
        budget = auto_budget_file(config)
        if budget.is_file():
            if is_auto_folder(run_dir):
                raise TailorError(f"{name} is a finished auto search: start a new one to search again")
            return self.queue.submit(name, self.folders.own_file(config), run_dir, self.folders.log_file(name),
                                     resume=True, budget=self.folders.own_file(budget).read_text().strip()).public()
        status = load_run(run_dir).status
        if status != "interrupted":
            raise TailorError(f"{name} is {status}: only an interrupted run can be resumed")
        log = self.folders.log_file(name)
        return self.queue.submit(name, run_dir / "config.yaml", run_dir, log, resume=True).public()

    def close(self) -> None:
        self.queue.close()
        for chat in self.chats.values():
            chat.close()


def checked_settings(settings: dict, folders: Folders) -> dict:
    """The settings with every file they name resolved inside the allowed folders (Refused otherwise), at any
    depth and inside lists, and with the output settings that could place a run elsewhere refused."""

    def visit(node, keys: tuple[str, ...]):
        if keys[-2:] in PATH_SETTINGS and node is not None and not isinstance(node, str):
            raise TailorError(f"{'.'.join(keys)}: a path is text, not {type(node).__name__}")
        if isinstance(node, dict):
            # a key holding dots is a setting's dotted name, so it counts as the keys it spells
            return {key: visit(value, keys + tuple(str(key).split("."))) for key, value in node.items()}
        if isinstance(node, list):
            return [visit(item, keys) for item in node]  # a list's items sit at the list's own setting
        return _checked_value(node, keys, folders)

    return visit(settings, ())


def _checked_value(value, keys: tuple[str, ...], folders: Folders):
    setting = ".".join(keys)
    if isinstance(value, float) and not math.isfinite(value):
        # JSON answers cannot carry it, so a saved draft holding one would break every page that reads it
        raise TailorError(f"{setting}: {value} is not a number a setting can hold")
    if keys == ("output", "dir") and value is not None:
        raise Refused(f"output.dir: the studio places every run in {folders.runs} under output.name and a time; "
                      f"set output.name instead")
    if keys == ("output", "name"):
        return folders.check_run_name(value)
    if keys == ("track", "mlflow_uri") and isinstance(value, str) and value \
            and not value.startswith(("http://", "https://")):
        raise Refused(f"track.mlflow_uri {value!r}: the studio keeps MLflow's local store beside its runs; name "
                      f"an http(s):// tracking server or leave it empty")
    if keys[-2:] == ("tasks", "name") and isinstance(value, str) and not RUN_NAME.match(value):
        raise Refused(f"tasks.name {value!r}: a task name becomes a folder of its run (tasks/NAME), so it must be "
                      f"a plain name (letters, digits, '.', '_' and '-')")
    if keys[-2:] not in PATH_SETTINGS or value is None or value == "":
        return value
    if keys[-2:] == ("model", "path"):
        return value if value == DEFAULT_MODEL else str(folders.readable_file(value, "model"))
    return value if value.startswith(BUILTIN_DATA) else str(folders.readable_file(value, "file"))


def _yaml(settings: dict) -> str:
    return yaml.safe_dump(settings, sort_keys=False, allow_unicode=True)


def _remove(settings: dict, parts: list[str]) -> None:
    node = settings
    for part in parts[:-1]:
        node = node.get(part)
        if not isinstance(node, dict):
            return
    node.pop(parts[-1], None)
