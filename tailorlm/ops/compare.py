"""Runs side by side: `tailor compare`, Run.compare and the studio's Compare page."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Iterable

if TYPE_CHECKING:
    from tailorlm.track.compare import Comparison


def compare(runs: Iterable[str | Path | object]) -> Comparison:
    """The runs' config differences, metrics and curves (track.compare.Comparison), in the order given. A run is
    a path, or anything with a `path` (a Run, a RunDir, a registry record)."""
    from tailorlm.track.compare import compare_runs

    return compare_runs([getattr(run, "path", run) for run in runs])
