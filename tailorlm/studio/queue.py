"""Runs started from the studio: one trains at a time, the others wait in order.

Each run is the CLI itself, `python -m tailorlm run CONFIG --output RUN_DIR`, in its own process. So a studio run
is an ordinary run directory in every respect (resumable with `tailor run --resume`, listed by `tailor runs`),
the metrics are the ones `tailor run CONFIG` gives, and stopping or killing the studio cannot corrupt a run:
the run directory's own rules (atomic checkpoints, the run lock) apply to a process stopped at any moment.
Stop sends the process an interrupt, as Ctrl-C does in a terminal; Resume queues `tailor run --resume RUN_DIR`,
for a run stopped here or interrupted anywhere else.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Job:
    name: str
    config: Path
    run_dir: Path
    log: Path
    resume: bool = False  # continue the interrupted run in run_dir (its own config.yaml) instead of starting one
    state: str = "queued"  # queued, running, complete, failed, stopped
    queued_at: float = field(default_factory=time.time)
    returncode: int | None = None
    process: subprocess.Popen | None = field(default=None, repr=False)

    def public(self) -> dict:
        return {"name": self.name, "state": self.state, "returncode": self.returncode,
                "queued_at": self.queued_at, "log": self.log.name}


class RunQueue:
    """A worker thread that starts queued runs one after another."""

    def __init__(self, python: str = sys.executable):
        self.python = python
        self.jobs: list[Job] = []
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._closed = False
        self._worker = threading.Thread(target=self._work, name="studio-runs", daemon=True)
        self._worker.start()

    def submit(self, name: str, config: Path, run_dir: Path, log: Path, resume: bool = False) -> Job:
        with self._lock:
            job = Job(name, config, run_dir, log, resume)
            self.jobs.append(job)
            self._wake.notify()
            return job

    def get(self, name: str) -> Job | None:
        with self._lock:
            return next((j for j in reversed(self.jobs) if j.name == name), None)

    def listing(self) -> list[dict]:
        with self._lock:
            return [j.public() for j in self.jobs]

    def stop(self, name: str) -> bool:
        """A queued run leaves the queue; a running one is interrupted (its checkpoints stay, --resume continues)."""
        with self._lock:
            job = next((j for j in self.jobs if j.name == name and j.state in ("queued", "running")), None)
            if job is None:
                return False
            if job.state == "queued":
                job.state = "stopped"
            elif job.process is not None:
                job.process.send_signal(signal.SIGINT)
            return True

    def close(self) -> None:
        """Stop the worker; a run in progress is interrupted and waited for, so it ends as Ctrl-C leaves it."""
        with self._lock:
            self._closed = True
            running = [j for j in self.jobs if j.state == "running" and j.process is not None]
            self._wake.notify()
        for job in running:
            job.process.send_signal(signal.SIGINT)
            try:
                job.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                job.process.kill()

    def _next(self) -> Job | None:
        with self._lock:
            while not self._closed:
                job = next((j for j in self.jobs if j.state == "queued"), None)
                if job is not None:
                    job.state = "running"
                    return job
                self._wake.wait()
            return None

    def _work(self) -> None:
        while (job := self._next()) is not None:
            env = {**os.environ, "PYTHONUNBUFFERED": "1", "TERM": "dumb", "COLUMNS": "100"}
            args = ["--resume", str(job.run_dir)] if job.resume else [str(job.config), "--output", str(job.run_dir)]
            with open(job.log, "a" if job.resume else "w", encoding="utf-8") as out:
                process = subprocess.Popen([self.python, "-m", "tailorlm", "run", *args], stdout=out,
                                           stderr=subprocess.STDOUT, env=env)
                with self._lock:
                    job.process = process
                code = process.wait()
            with self._lock:
                job.returncode = code
                job.process = None
                job.state = "complete" if code == 0 else ("stopped" if code in (130, -signal.SIGINT) else "failed")
