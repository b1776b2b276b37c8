"""The run directory: where it is, who may write to it, and what state it is in.

One process writes a run directory at a time. `RunLock` holds an exclusive flock on `<run>/.lock` for the
life of the process; the kernel drops it when the process dies, even by SIGKILL, so a crashed run never
leaves a stale lock behind and `--resume` can take over at once.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
from datetime import datetime
from pathlib import Path

from tailorlm.config import RunConfig
from tailorlm.errors import TailorError

LOCK = ".lock"


def resolve_output_dir(cfg: RunConfig) -> Path:
    if cfg.output.dir:
        return Path(cfg.output.dir)
    return Path("runs") / f"{cfg.output.name}-{datetime.now():%Y%m%d-%H%M%S}"


class RunLock:
    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK
        self.fd: int | None = None

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise TailorError(f"{self.path.parent} is being written by another tailor process (pid {holder}); "
                              f"wait for it to finish, or choose another --output") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def check_output_dir(path: Path, overwrite: bool, resume: bool = False) -> None:
    """What open_run_dir would refuse, checked before minutes of data preparation (and again when it opens)."""
    if path.exists() and not path.is_dir():
        raise TailorError(f"output directory {path} is an existing file, not a folder; choose another --output")
    if resume:
        if not (path / "config.yaml").is_file():
            raise TailorError(f"--resume: {path} is not a run directory (no config.yaml)")
        return
    if path.exists() and any(p.name != LOCK for p in path.iterdir()) and not overwrite:
        raise TailorError(f"output directory {path} already exists and is not empty; choose another --output, "
                          f"set output.overwrite=true, or continue it with `tailor run --resume {path}`")
    for parent in path.parents:  # a file where a folder of the path should be: mkdir would fail later
        if parent.exists() and not parent.is_dir():
            raise TailorError(f"output directory {path}: {parent} is a file, not a folder; choose another --output")


def open_run_dir(path: Path, overwrite: bool, resume: bool = False) -> RunLock:
    """Lock the run directory, then make sure it is empty (a new run) or a run to continue (resume)."""
    check_output_dir(path, overwrite, resume)
    if resume:
        return RunLock(path).acquire()
    lock = RunLock(path).acquire()  # before deleting anything: never wipe a directory another run is writing
    for child in path.iterdir():
        if child.name != LOCK:
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    return lock


def read_status(run_dir: Path) -> dict:
    try:
        return json.loads((Path(run_dir) / "run.json").read_text())
    except (OSError, ValueError):
        return {}
