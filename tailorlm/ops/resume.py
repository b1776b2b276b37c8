"""The checks made before an interrupted run is continued, for `tailor run --resume` and tailorlm.run(resume=True).

The studio's Resume runs `tailor run --resume`, so it passes here too. The checks that need the run to have
started stay with the pipeline, which every resume reaches: RunDir.open takes the run's lock (another process
writing the run is an error naming its pid), and a run that is already complete is said so and left as it is
(pipeline/runner.py).
"""
from __future__ import annotations

from pathlib import Path

from tailorlm.errors import TailorError
from tailorlm.rundir import RunDir


def resume_config(run_dir: str | Path, asked_as: str) -> Path:
    """The config.yaml a resumed run continues with: the one it was started with. Unless run_dir is a run
    directory, an error that begins with `asked_as`, the way the caller asked to resume (`--resume`, ...)."""
    run = RunDir(run_dir)
    if not run.is_run():
        raise TailorError(f"{asked_as}: {run_dir} is not a run directory (no config.yaml)")
    return run / "config.yaml"
