"""One error type for everything a user can get wrong, so the CLI can print it cleanly.

Every message names where the problem is (file, line or row) and what is wrong; the CLI prints
it without a traceback and exits non-zero.
"""
from __future__ import annotations

import difflib
import errno
import re
from pathlib import Path

# ENOSPC: no space left on the device; EDQUOT: the user's disk quota is used up. Either way a write failed
# for want of space, which the user can fix and then resume from; neither is a bug.
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class TailorError(Exception):
    """A problem with the user's input or setup (not a bug in tailorlm)."""


class ConfigError(TailorError):
    def __init__(self, source: str, problems: list[str]):
        self.source, self.problems = source, problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source}: {len(problems)} problem(s) in the config:\n{lines}")


class DataError(TailorError):
    def __init__(self, path: str | Path, where: str | None, problem: str):
        self.path, self.where, self.problem = str(path), where, problem
        location = f"{path}, {where}" if where else str(path)
        super().__init__(f"{location}: {problem}")


class DiskFullError(TailorError):
    """A write that failed for want of space: names what could not be written and where to free space, and
    `then` says what to do once there is room (e.g. resume the run). `error` is the failure it reports."""

    def __init__(self, target: str | Path, folder: str | Path, error: BaseException, then: str = ""):
        self.target, self.folder = Path(target), Path(folder)
        self.errno = disk_full_errno(error) or errno.ENOSPC
        super().__init__(f"{no_space(self.errno)}: could not write {target}; free some space on the disk that "
                         f"holds {folder}{then}")


def no_space(code: int) -> str:
    return "the disk quota is used up" if code == errno.EDQUOT else "the disk is full"


# How Rust libraries (safetensors, tokenizers) spell the OS error inside their own exception's text: "(os error
# 28)" as io::Error displays (safetensors 0.8: "I/O error: No space left on device (os error 28)"), or
# "Os { code: 28, ..." as it debug-prints.
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)|Os \{ code: (\d+),")


def disk_full_errno(error: BaseException) -> int | None:
    """ENOSPC or EDQUOT when `error` is a write that failed for want of space, else None: an OSError, or an
    exception of a Rust library (safetensors' SafetensorError) that carries the OS error in its text."""
    if isinstance(error, DiskFullError):
        return error.errno
    if isinstance(error, TailorError):  # its text may quote the user's data, which may say anything
        return None
    if isinstance(error, OSError):
        return error.errno if error.errno in DISK_FULL_ERRNOS else None
    found = _RUST_OS_ERROR.search(str(error))
    code = int(found.group(1) or found.group(2)) if found else None
    return code if code in DISK_FULL_ERRNOS else None


def is_disk_full(error: BaseException) -> bool:
    return disk_full_errno(error) is not None


def did_you_mean(name: str, choices) -> str:
    """A ' (did you mean 'x'?)' hint for a misspelled name, or '' when nothing is close."""
    close = difflib.get_close_matches(name, [str(c) for c in choices], n=1, cutoff=0.6)
    if not close:  # a different case, or a shortened/extended name ('evaluation' for 'eval')
        low = name.lower()
        close = [str(c) for c in choices if str(c).lower() == low or
                 (min(len(low), len(str(c))) >= 3 and (low.startswith(str(c).lower()) or str(c).lower().startswith(low)))]
    return f" (did you mean '{close[0]}'?)" if close else ""
