"""Rich progress bars for long work; silent when disabled or when output is not a terminal."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True)


class Bar:
    """What `progress_bar` yields: `bar()` advances one step, `bar(postfix)` too and replaces the
    text after the bar (e.g. "loss 1.23  lr 2.0e-05"); `describe` says what runs now (the current
    job). All are no-ops when the bar is off."""

    def __init__(self, progress: Progress | None = None, task: TaskID | None = None, description: str = ""):
        self._progress, self._task, self._description = progress, task, description

    def __call__(self, postfix: str | None = None) -> None:
        if self._progress is None:
            return
        if postfix is None:
            self._progress.advance(self._task)
        else:
            self._progress.update(self._task, advance=1, postfix=postfix)

    def describe(self, text: str) -> None:
        if self._progress is not None:
            self._progress.update(self._task, description=f"{self._description}: {text}")


@contextmanager
def progress_bar(total: int, description: str, enabled: bool = True) -> Iterator[Bar]:
    """Yield a `Bar`; it shows done/total, elapsed time and an ETA, and disappears when done."""
    if not enabled:
        yield Bar()
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("ETA"), TimeRemainingColumn(), TextColumn("{task.fields[postfix]}"))
    # Not redirecting sys.stdout/err: third-party prints must reach the log file (core/third_party.py).
    with Progress(*columns, console=console, transient=True, redirect_stdout=False,
                  redirect_stderr=False) as progress:
        task = progress.add_task(description, total=total, postfix="")
        yield Bar(progress, task, description)
