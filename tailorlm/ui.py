"""Terminal output: one rich console and progress bars with an ETA, shared by every stage."""
from __future__ import annotations

import contextlib
import datetime
import threading
import time
from contextlib import contextmanager

from rich.console import Console
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


@contextmanager
def progress(description: str, total: int):
    """A progress bar with elapsed time and ETA; yields advance(n=1, info=None).

    Into a file or a pipe there is no bar to redraw: one line is printed when the work is done. In a terminal (or
    a notebook) a bar opened inside another (the evaluations during training) is a second line of the same
    display, and goes when its work is done: two live displays at once leave stale and blank lines behind."""
    if not console.redrawn:
        state = {"done": 0, "info": ""}
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
        task = bar.add_task(description, total=total, info="")
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
    console.rule(f"[bold cyan]{title}")
