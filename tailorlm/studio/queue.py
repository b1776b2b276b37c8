"""Runs started from the studio: one trains at a time, the others wait in order.

Each run is the CLI itself, `python -m tailorlm run CONFIG --output RUN_DIR` (an auto search: `tailor auto CONFIG
--budget B --output RUN_DIR`, its trials in that folder), in its own process. So a studio run
is an ordinary run directory in every respect (resumable with `tailor run --resume`, listed by `tailor runs`),
the metrics are the ones `tailor run CONFIG` gives, and stopping or killing the studio cannot corrupt a run:
the run directory's own rules (atomic checkpoints, the run lock) apply to a process stopped at any moment.
Stop sends the process an interrupt, as Ctrl-C does in a terminal; Resume queues `tailor run --resume RUN_DIR`,
for a run stopped here or interrupted anywhere else.

A studio that ends normally (Ctrl-C, SIGTERM) interrupts its run and waits for it (close). One killed outright
(SIGKILL, a crash) cannot, so on Linux each run is started with the kernel's parent-death signal set to SIGINT:
the run is interrupted as by Ctrl-C the moment the studio dies, and never trains on as an orphan. Elsewhere
(macOS, Windows) there is no such signal, and a run outlives a killed studio (it can be stopped with Ctrl-C
or kill, and resumed as usual).
"""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from tailorlm.ui import PROGRESS_FILE_ENV

CLOSE_WAIT_S = 60  # how long closing waits for an interrupted run to save its state before killing it
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def progress_file(log: Path) -> Path:
    """Where a run started here reports what it is doing (its stage, its open progress bars)."""
    return log.with_suffix(".progress.json")


@dataclass
class Job:
    name: str
    config: Path
    run_dir: Path
    log: Path
    resume: bool = False  # continue the interrupted run in run_dir (its own config.yaml) instead of starting one
    budget: str | None = None  # an auto search within this budget (`tailor auto`), its folder run_dir
    state: str = "queued"  # queued, running, complete, failed, stopped
    queued_at: float = field(default_factory=time.time)
    returncode: int | None = None
    error: str | None = None  # why it could not start
    stop_requested: bool = False  # Stop pressed (or the studio closing) while the run was being started
    process: subprocess.Popen | None = field(default=None, repr=False)

    def public(self) -> dict:
        return {"name": self.name, "state": self.state, "returncode": self.returncode, "kind": self.kind,
                "queued_at": self.queued_at, "log": self.log.name, "error": self.error}

    @property
    def kind(self) -> str:
        return "auto" if self.budget else "run"

    def command(self) -> list[str]:
        """The CLI's arguments for this job."""
        if self.budget:  # run again, an auto search reads its finished trials back from its study
            return ["auto", str(self.config), "--budget", self.budget, "--output", str(self.run_dir)]
        return ["run", "--resume", str(self.run_dir)] if self.resume else ["run", str(self.config), "--output",
                                                                            str(self.run_dir)]


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

    def submit(self, name: str, config: Path, run_dir: Path, log: Path, resume: bool = False,
               budget: str | None = None) -> Job:
        with self._lock:
            job = Job(name, config, run_dir, log, resume, budget)
            self.jobs.append(job)
            self._wake.notify()
            return job

    def get(self, name: str) -> Job | None:
        with self._lock:
            return next((j for j in reversed(self.jobs) if j.name == name), None)

    def listing(self) -> list[dict]:
        with self._lock:
            return [j.public() for j in self.jobs]

    def active(self) -> list[Job]:
        """The runs queued or running, in order."""
        with self._lock:
            return [j for j in self.jobs if j.state in ("queued", "running")]

    def stop(self, name: str) -> bool:
        """A queued run leaves the queue; a running one is interrupted (its checkpoints stay, --resume continues)."""
        with self._lock:
            job = next((j for j in self.jobs if j.name == name and j.state in ("queued", "running")), None)
            if job is None:
                return False
            if job.state == "queued":
                job.state = "stopped"
            else:
                self._interrupt(job)
            return True

    def close(self) -> None:
        """Stop the worker; a run in progress is interrupted and waited for, so it ends as Ctrl-C leaves it."""
        with self._lock:
            self._closed = True
            for job in self.jobs:
                if job.state == "running":
                    self._interrupt(job)
            self._wake.notify()
        self._worker.join(timeout=CLOSE_WAIT_S)  # the worker returns once its run has exited
        if self._worker.is_alive():  # a run that does not answer its interrupt
            with self._lock:
                stuck = [j.process for j in self.jobs if j.process is not None]
            for process in stuck:
                process.kill()
            self._worker.join(timeout=10)

    def _interrupt(self, job: Job) -> None:
        """Interrupt a running job (the lock held). Between _next and Popen it has no process yet: the worker
        sees stop_requested as soon as it has one, so a Stop in that moment is not lost."""
        job.stop_requested = True
        if job.process is not None:
            job.process.send_signal(signal.SIGINT)

    def _not_started(self, job: Job, error: OSError) -> None:
        """A run that could not start fails with the reason; the worker lives on, so the queue does not stall."""
        with self._lock:
            job.state, job.error = "failed", f"could not start the run: {error}"

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
            # The run reports its stage and progress bars to a file beside its log (ui.PROGRESS_FILE_ENV), which
            # the live panel reads: the log shows a bar only once its work is done.
            env = {**os.environ, "PYTHONUNBUFFERED": "1", "TERM": "dumb", "COLUMNS": "100",
                   PROGRESS_FILE_ENV: str(progress_file(job.log))}
            with self._lock:
                if job.stop_requested:  # stopped before it started
                    job.state = "stopped"
                    continue
            try:
                # O_NOFOLLOW: a link put where the log goes is refused, not written through
                out = open(job.log, "a" if job.resume else "w", encoding="utf-8",
                           opener=lambda path, flags: os.open(path, flags | getattr(os, "O_NOFOLLOW", 0), 0o666))
            except OSError as e:
                self._not_started(job, e)
                continue
            with out:
                try:
                    process = subprocess.Popen([self.python, "-m", "tailorlm", *job.command()], stdout=out,
                                               stderr=subprocess.STDOUT, env=env, preexec_fn=_interrupt_when_orphaned())
                except OSError as e:
                    self._not_started(job, e)
                    continue
                with self._lock:
                    job.process = process
                    if job.stop_requested:
                        process.send_signal(signal.SIGINT)
                code = process.wait()
            with self._lock:
                job.returncode = code
                job.process = None
                job.state = "complete" if code == 0 else ("stopped" if code in (130, -signal.SIGINT) else "failed")


def _interrupt_when_orphaned():
    """A preexec_fn (run in the child between fork and exec) that has the kernel send the run SIGINT when the
    studio dies, even by SIGKILL; None where the platform has no parent-death signal (see the module's note).

    The kernel ties the signal to the thread that forked, not the process: here the queue's worker thread,
    which lives as long as the studio and is waiting on this very run. The check of the parent's pid covers a
    studio killed between fork and prctl, which the signal would miss."""
    if _LIBC is None:
        return None
    studio = os.getpid()

    def set_signal() -> None:
        # Stop is SIGINT, so the run must receive it whatever the studio inherited: a process started in the
        # background of a script has SIGINT ignored, which a child would inherit (and a shell could not undo),
        # and a thread may have it blocked. Python's signal.signal only works in the main thread: libc's here.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        _LIBC.signal(signal.SIGINT, 0)  # SIG_DFL
        _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGINT, 0, 0, 0)
        if os.getppid() != studio:
            os._exit(1)

    return set_signal
