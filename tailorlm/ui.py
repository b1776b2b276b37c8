"""Terminal output: one rich console and progress bars with an ETA, shared by every stage."""
from __future__ import annotations

from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=False, highlight=False)


@contextmanager
def progress(description: str, total: int):
    """A progress bar with elapsed time and ETA; yields advance(n=1, info=None)."""
    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                   console=console, transient=False)
    with bar:
        task = bar.add_task(description, total=total, info="")

        def advance(n: int = 1, info: str | None = None):
            bar.update(task, advance=n, **({"info": info} if info is not None else {}))

        yield advance


def stage(title: str) -> None:
    console.rule(f"[bold cyan]{title}")
