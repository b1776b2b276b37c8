"""Which files the studio may touch: every path a request names is resolved here, or refused.

A request can name a data file, a model, a run or an upload. Each is resolved to its real path (symbolic links
followed, `..` collapsed) and must then lie inside one of the studio's allowed folders: its own home (uploads,
configs, logs), the runs folder and the data folders given on the command line. A link that points outside
them is refused like the path it points to, so a link placed in an allowed folder opens nothing new.
"""
from __future__ import annotations

import os
import re
import uuid
from pathlib import Path

from tailorlm.errors import TailorError

MAX_UPLOAD_BYTES = 200 * 1024 * 1024  # a labeled table, not a corpus: larger files are read from disk by path
UPLOAD_SUFFIXES = (".csv", ".tsv", ".jsonl", ".ndjson", ".json", ".parquet", ".pq", ".txt", ".conll")
RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


class Refused(TailorError):
    """A path outside the allowed folders, or a name that is not one; the studio answers 403 with the message."""


class Folders:
    """The studio's allowed folders: home (its own files), runs and the data folders it may read."""

    def __init__(self, home: Path, runs: Path, data: list[Path]):
        self.home = _real(home)
        self.runs = _real(runs)
        self.data = [_real(d) for d in data]
        for folder in (self.home / "uploads", self.home / "configs", self.home / "logs", self.runs):
            folder.mkdir(parents=True, exist_ok=True)

    @property
    def readable(self) -> list[Path]:
        return [self.home, self.runs, *self.data]

    def readable_file(self, given: str, what: str = "file") -> Path:
        """An existing file or folder (a model folder) inside the allowed folders; relative paths are read from
        the first data folder (the directory the studio was started in, by default)."""
        if not given or "\x00" in given:
            raise Refused(f"no {what} given")
        path = Path(given).expanduser()
        path = _real(path if path.is_absolute() else (self.data[0] if self.data else self.home) / path)
        if not any(_inside(path, root) for root in self.readable):
            raise Refused(f"{given}: outside the folders this studio may read ({', '.join(map(str, self.readable))}); "
                          f"start it with --data FOLDER to allow another")
        if not path.exists():
            raise Refused(f"{given}: no such {what}")
        return path

    def run_dir(self, name: str) -> Path:
        """The run folder `name`, directly inside the runs folder (a name, never a path)."""
        if not RUN_NAME.match(name or ""):
            raise Refused(f"{name!r} is not a run name (letters, digits, '.', '_' and '-')")
        path = _real(self.runs / name)
        if path.parent != self.runs:
            raise Refused(f"{name}: not a run of {self.runs}")
        return path

    def upload_path(self, filename: str) -> Path:
        """Where an upload named `filename` is stored: under home/uploads, a fresh name keeping its suffix."""
        base = Path(filename or "").name
        suffix = Path(base).suffix.lower()
        if suffix not in UPLOAD_SUFFIXES:
            raise Refused(f"{base or 'the upload'}: not a data file this studio reads ({', '.join(UPLOAD_SUFFIXES)})")
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(base).stem)[:60] or "data"
        return self.home / "uploads" / f"{stem}-{uuid.uuid4().hex[:8]}{suffix}"


def _real(path: Path) -> Path:
    return Path(os.path.realpath(path))


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents
