"""One error type for everything a user can get wrong, so the CLI can print it cleanly.

Every message names where the problem is (file, line or row) and what is wrong; the CLI prints
it without a traceback and exits non-zero.
"""
from __future__ import annotations

import difflib
from pathlib import Path


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


def did_you_mean(name: str, choices) -> str:
    """A ' (did you mean 'x'?)' hint for a misspelled name, or '' when nothing is close."""
    close = difflib.get_close_matches(name, [str(c) for c in choices], n=1, cutoff=0.6)
    if not close:  # a different case, or a shortened/extended name ('evaluation' for 'eval')
        low = name.lower()
        close = [str(c) for c in choices if str(c).lower() == low or
                 (min(len(low), len(str(c))) >= 3 and (low.startswith(str(c).lower()) or str(c).lower().startswith(low)))]
    return f" (did you mean '{close[0]}'?)" if close else ""
