"""The studio's server-side state: the draft config the forms edit, the run queue, chats and exports.

State lives here, not in the browser, so a refresh or a second tab shows the same draft, the same queue and the
same live run. The draft is saved to the studio's home on every change, so restarting the studio keeps it.
"""
from __future__ import annotations

import copy
import json
import threading
import time
from pathlib import Path

import yaml

from tailorlm.config import RunConfig, load_config
from tailorlm.errors import TailorError
from tailorlm.rundir import write_json, write_text
from tailorlm.studio.paths import Folders
from tailorlm.studio.queue import RunQueue

# The studio's starting draft: a classification table, small enough to train in minutes on a CPU.
STARTING_DRAFT = {"template": {"preset": "classification"}, "output": {"name": "studio"}}


class Draft:
    """The config the forms build, as the nested settings a YAML file would hold (defaults left out)."""

    def __init__(self, path: Path):
        self.path = path
        self.settings = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else copy.deepcopy(STARTING_DRAFT)
        self._lock = threading.Lock()

    def update(self, changes: dict, removals: list[str] = ()) -> None:
        """Set dotted keys (None or '' removes one, back to the default) and save."""
        with self._lock:
            for key in removals:
                _remove(self.settings, key.split("."))
            for key, value in changes.items():
                parts = key.split(".")
                if value is None or value == "":
                    _remove(self.settings, parts)
                else:
                    node = self.settings
                    for part in parts[:-1]:
                        if not isinstance(node.get(part), dict):
                            node[part] = {}
                        node = node[part]
                    node[parts[-1]] = value
            write_json(self.path, self.settings)

    def yaml(self) -> str:
        return yaml.safe_dump(self.settings, sort_keys=False, allow_unicode=True)

    def config(self) -> RunConfig:
        """The draft validated as `tailor run` validates a file (ConfigError names the setting)."""
        return load_config(None, [], text=self.yaml(), source="the studio's settings")


class Studio:
    def __init__(self, folders: Folders, token: str | None = None):
        self.folders = folders
        self.token = token
        self.draft = Draft(folders.home / "draft.json")
        self.queue = RunQueue()
        self.chats: dict[str, object] = {}
        self.chat_lock = threading.Lock()
        self.exports: dict[str, dict] = {}

    def start_run(self) -> dict:
        """Queue the draft as a run: its YAML saved under configs/, its folder under the runs folder."""
        cfg = self.draft.config()
        name = f"{cfg.output.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        while (self.folders.runs / name).exists() or self.queue.get(name):
            name += "x"
        config = self.folders.home / "configs" / f"{name}.yaml"
        write_text(config, self.draft.yaml())
        job = self.queue.submit(name, config, self.folders.runs / name, self.folders.home / "logs" / f"{name}.log")
        return job.public()

    def resume_run(self, run_dir: Path) -> dict:
        """Queue an interrupted run (from the studio or the CLI) to continue from its latest checkpoint."""
        from tailorlm.track.registry import load_run

        status = load_run(run_dir).status
        if status != "interrupted":
            raise TailorError(f"{run_dir.name} is {status}: only an interrupted run can be resumed")
        log = self.folders.home / "logs" / f"{run_dir.name}.log"
        return self.queue.submit(run_dir.name, run_dir / "config.yaml", run_dir, log, resume=True).public()

    def close(self) -> None:
        self.queue.close()
        for chat in self.chats.values():
            chat.close()


def _remove(settings: dict, parts: list[str]) -> None:
    node = settings
    for part in parts[:-1]:
        node = node.get(part)
        if not isinstance(node, dict):
            return
    node.pop(parts[-1], None)
