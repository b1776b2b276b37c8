"""Terminal output: one rich console and progress bars with an ETA, shared by every stage."""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import threading
import time
from contextlib import contextmanager

from rich.cells import cell_len
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Column


class _Console(Console):
    """rich's console, except that into a file or a pipe (CI, the studio's run log) a printed line stays one line,
    where rich would cut it at 80 columns; a terminal or a notebook keeps rich's word wrapping. Decided at each
    print, since the output can be redirected after import."""

    @property
    def redrawn(self) -> bool:
        """Whether this output can redraw a live progress bar: a terminal, or a Jupyter notebook's widget."""
        return self.is_terminal or self.is_jupyter

    @property
    def soft_wrap(self) -> bool:
        return not self.redrawn

    @soft_wrap.setter
    def soft_wrap(self, value: bool) -> None:  # rich's __init__ sets it; the property above decides
        pass


console = _Console(stderr=False, highlight=False)


_local = threading.local()  # .shown: this thread's bar on screen; a bar opened inside it joins it as a line

# A watcher of this process (the studio, for the runs it starts) names a file here and reads what the process is
# doing from it: the stage and the open progress bars, with their counts and times. The log alone cannot say it:
# into a file a bar prints one line only once its work is done, so minutes of baselines read as silence.
PROGRESS_FILE_ENV = "TAILOR_PROGRESS_FILE"
PROGRESS_EVERY_S = 0.5  # at most this often while a bar advances; opening or closing one is written at once


class _ProgressFile:
    def __init__(self):
        self.lock = threading.Lock()
        self.stage: str | None = None
        self.bars: list[dict] = []
        self.started = time.time()
        self.written = 0.0

    @property
    def path(self) -> str | None:
        return os.environ.get(PROGRESS_FILE_ENV) or None

    def write(self, now: bool = False) -> None:
        path = self.path
        if path is None or (not now and time.monotonic() - self.written < PROGRESS_EVERY_S):
            return
        with self.lock:
            self.written = time.monotonic()
            clock = time.time()
            state = {"stage": self.stage, "started": round(self.started, 3), "updated": round(clock, 3),
                     "bars": [{**bar, "elapsed": round(clock - bar["opened"], 1)} for bar in self.bars]}
            # Written whole and renamed into place, so a reader never sees half a file. By hand rather than with
            # rundir's writers: this module is the lowest layer, and a lost update costs nothing.
            temporary = f"{path}.{os.getpid()}.tmp"
            try:
                with open(temporary, "w", encoding="utf-8") as out:
                    json.dump(state, out)
                os.replace(temporary, path)
            except OSError:  # the watcher's file is a courtesy: never a reason for the work itself to fail
                with contextlib.suppress(OSError):
                    os.unlink(temporary)


_progress_file = _ProgressFile()


@contextmanager
def _reported(description: str, total: int, done: int = 0):
    """The bar's entry in the progress file, open while its work goes on; yields count(n, info). `start` is the
    work done before it opened (a resumed run's steps), which the watcher's rate leaves out."""
    bar = {"description": description, "done": done, "start": done, "total": total, "info": "",
           "opened": round(time.time(), 3)}
    with _progress_file.lock:
        _progress_file.bars.append(bar)
    _progress_file.write(now=True)

    def count(n: int = 1, info: str | None = None) -> None:
        bar["done"] += n
        bar["info"] = bar["info"] if info is None else info
        _progress_file.write()

    try:
        yield count
    finally:
        with _progress_file.lock:
            _progress_file.bars.remove(bar)
        _progress_file.write(now=True)


@contextmanager
def progress(description: str, total: int, done: int = 0):
    """A progress bar with elapsed time and ETA; yields advance(n=1, info=None). `done` is the work already done
    when it opens (a resumed run's steps): counted, but not in the rate the ETA comes from.

    Into a file or a pipe there is no bar to redraw: one line is printed when the work is done. In a terminal (or
    a notebook) a bar opened inside another (the evaluations during training) is a second line of the same
    display, and goes when its work is done: two live displays at once leave stale and blank lines behind.
    With TAILOR_PROGRESS_FILE set, the bar's counts also go to that file (see _ProgressFile)."""
    with _reported(description, total, done) as report, _bar(description, total, done) as shown:
        def advance(n: int = 1, info: str | None = None):
            report(n, info)
            shown(n, info)

        yield advance


@contextmanager
def _bar(description: str, total: int, done: int = 0):
    if not console.redrawn:
        state = {"done": done, "info": ""}
        started = time.perf_counter()

        def count(n: int = 1, info: str | None = None):
            state["done"] += n
            state["info"] = state["info"] if info is None else info

        yield count
        elapsed = datetime.timedelta(seconds=round(time.perf_counter() - started))
        console.print(f"{description}: {state['done']}/{total} in {elapsed}" + (f", {state['info']}" if state["info"]
                                                                                else ""), markup=False)
        return
    shown = _local.__dict__.setdefault("shown", [])
    inner = bool(shown)
    bar = shown[-1] if inner else _new_bar()
    with contextlib.nullcontext() if inner else bar:
        task = bar.add_task(description, total=total, completed=done, info="")
        shown.append(bar)

        def advance(n: int = 1, info: str | None = None):
            bar.update(task, advance=n, **({"info": info} if info is not None else {}))

        try:
            yield advance
        finally:
            shown.pop()
            if inner:
                bar.remove_task(task)


def _new_bar() -> Progress:
    # On a narrow terminal (80 columns) the bar gives up its width first; the counts and times keep theirs
    # instead of being cut to "0:…" as rich's defaults do.
    def kept() -> Column:
        return Column(no_wrap=True)

    return Progress(TextColumn("[bold]{task.description}", table_column=Column(no_wrap=True, overflow="ellipsis")),
                    BarColumn(bar_width=40, table_column=Column(min_width=3)), MofNCompleteColumn(table_column=kept()),
                    TextColumn("{task.fields[info]}", table_column=kept()), TimeElapsedColumn(table_column=kept()),
                    TextColumn("ETA", table_column=kept()), TimeRemainingColumn(table_column=kept()),
                    console=console, transient=False)


def stage(title: str) -> None:
    # rich's rule cuts a title that does not fit with an ellipsis, which loses the words a user needs (a path,
    # a config key): such a title goes on a line of its own under a bare rule
    if cell_len(title) + 6 <= console.width:  # the rule's own characters: at least '── ' and ' ──' either side
        console.rule(f"[bold cyan]{escape(title)}")
    else:
        console.rule(style="cyan")
        console.print(f"[bold cyan]{escape(title)}")
    _progress_file.stage = title
    _progress_file.write(now=True)
