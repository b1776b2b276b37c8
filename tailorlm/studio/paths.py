"""Which files the studio may touch: every path a request names is resolved here, or refused.

A request can name a data file, a model, a run or an upload. Each is resolved to its real path (symbolic links
followed, `..` collapsed) and must then lie inside one of the studio's allowed folders: its own home (uploads,
configs, logs), the runs folder and the data folders given on the command line. A link that points outside
them is refused like the path it points to, so a link placed in an allowed folder opens nothing new.

A run folder is read file by file (config.yaml, metrics.json, adapter/, ...) by code that trusts its layout, so
the rule for runs is stricter: a run folder that holds a symbolic link leading out of itself is refused as a
whole, by every route. `tailor run` never writes links, so a run that holds one was altered by hand, and
reading it could show any file the link names (a config.yaml linked to a secret, shown in full on the results
page). The studio's own files under home (the run logs) are refused when they are links.
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
MAX_OUTPUT_NAME = 80  # output.name, before the run's -YYYYMMDD-HHMMSS: the whole name stays a RUN_NAME


class Refused(TailorError):
    """A path outside the allowed folders, or a name that is not one; the studio answers 403 with the message."""

    http_status = 403


class Missing(TailorError):
    """A run that has no folder (yet); the studio answers 404 with the message."""

    http_status = 404


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
        if not isinstance(given, str) or not given or "\x00" in given:
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
        """The run folder `name` inside the runs folder, holding no link out of itself: a run name, or
        GROUP/NAME for a run of a group (a sweep's or an auto search's trials), never any other path. It need
        not exist yet (a queued run has no folder)."""
        parts = name.split("/") if isinstance(name, str) else [name]
        if not 1 <= len(parts) <= 2 or not all(isinstance(p, str) and RUN_NAME.match(p) for p in parts):
            raise Refused(f"{name!r} is not a run name (letters, digits, '.', '_' and '-'; GROUP/NAME for a run "
                          f"of a group)")
        path = _real(self.runs / name)
        # resolved first: a group or a run that is a link resolves to another place, and is refused
        if not (_inside(path, self.runs) and path.relative_to(self.runs).parts == tuple(parts)):
            raise Refused(f"{name}: not a run of {self.runs}")
        self.check_run_folder(path, name)
        return path

    def check_run_folder(self, path: Path, name: str) -> None:
        """Refuse a run folder that holds a symbolic link whose target lies outside that folder (the rule for
        every route that reads a run, and for the runs listing)."""
        link = _link_out_of(path)
        if link is not None:
            raise Refused(f"{name}: refused: {link.relative_to(path)} is a symbolic link leading out of the run "
                          f"folder, and the studio opens no run that holds one")

    def log_file(self, name: str) -> Path:
        """home/logs/NAME.log, where the queue writes a run's output; refused when it is a link (it would show,
        or overwrite, the file it names)."""
        if not isinstance(name, str) or not RUN_NAME.match(name):
            raise Refused(f"{name!r} is not a run name (letters, digits, '.', '_' and '-')")
        return self.own_file(self.home / "logs" / f"{name}.log")

    def own_file(self, path: Path) -> Path:
        """A file of the studio's own under home (it may not exist yet), refused when it or a folder on the way
        is a symbolic link."""
        if path.is_symlink() or _real(path.parent) != path.parent or not _inside(path, self.home):
            raise Refused(f"{path}: refused: the studio's own files are never symbolic links")
        return path

    def check_run_name(self, given, setting: str = "output.name") -> str:
        """A name a run folder is made of: a plain name, never a path (`../x` or `/tmp/x` would place the run,
        its config and its log anywhere writable)."""
        if not isinstance(given, str) or not RUN_NAME.match(given) or len(given) > MAX_OUTPUT_NAME:
            raise Refused(f"{setting} {given!r} is not a plain run name (up to {MAX_OUTPUT_NAME} letters, digits, "
                          f"'.', '_' and '-'): the studio places every run in {self.runs}")
        return given

    def upload_path(self, filename: str) -> Path:
        """Where an upload named `filename` is stored: under home/uploads, a fresh name keeping its suffix."""
        base = Path(filename or "").name
        suffix = Path(base).suffix.lower()
        if suffix not in UPLOAD_SUFFIXES:
            raise Refused(f"{base or 'the upload'}: not a data file this studio reads ({', '.join(UPLOAD_SUFFIXES)})")
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(base).stem)[:60] or "data"
        return self.own_file(self.home / "uploads" / f"{stem}-{uuid.uuid4().hex[:8]}{suffix}")


def _real(path: Path) -> Path:
    return Path(os.path.realpath(path))


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _link_out_of(folder: Path) -> Path | None:
    """The first symbolic link under `folder` (a resolved path) whose target resolves outside it; links are
    looked at, never followed, so a linked folder is not entered either."""
    pending = [folder]
    while pending:
        try:
            entries = list(os.scandir(pending.pop()))
        except OSError:  # gone while looking (a checkpoint rotated away): nothing there to read either
            continue
        for entry in entries:
            if entry.is_symlink():
                if not _inside(_real(Path(entry.path)), folder):
                    return Path(entry.path)
            elif entry.is_dir(follow_symlinks=False):
                pending.append(Path(entry.path))
    return None
