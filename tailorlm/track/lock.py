"""Is the process writing a run still alive? Asked of the run's own lock, never by taking it over.

run.json says "running" from the moment a run starts until it ends; a killed process (SIGKILL, power loss)
never gets to rewrite it. The pipeline holds an exclusive flock on <run>/.lock for the life of the process
(tailorlm/rundir.py) and the kernel drops it when the process dies. So a "running" run whose lock can be
taken was interrupted. The probe asks for a shared lock without waiting and gives it back at once: it never
blocks, and it never deletes or rewrites the file. Without a lock file (runs from older versions), or where
flock is unavailable, nothing can be told and the run stays "running".
"""
from __future__ import annotations

import os
from pathlib import Path

from tailorlm.rundir import LOCK


def writer_is_gone(run_dir: Path) -> bool:
    """True only when <run_dir>/.lock exists and no process holds it."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        return False
    try:
        fd = os.open(Path(run_dir) / LOCK, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:  # held: the run's process is alive
        return False
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return True
    finally:
        os.close(fd)
