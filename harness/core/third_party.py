"""Third-party output goes to a log file, so that the console shows only ours.

lm-eval, transformers, datasets and the `git` subprocess lm-eval runs print warnings, tqdm bars
and errors straight to the process's stdout and stderr (in the demo, 88 lines such as
"`pretrained` model kwarg is not of type `str`" and "fatal: not a git repository", mixed into
our progress bar). Inside `third_party_output_to(log)`, file descriptors 1 and 2 point at `log`
(appended, with a header per run), so everything written to them lands there, whoever writes it;
the consoles in `keep` (our progress bar's) are pointed at the terminal for that time.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from rich.console import Console


@contextmanager
def third_party_output_to(log_file: Path | None, keep: Sequence[Console] = ()) -> Iterator[None]:
    """Route fd 1 and 2 to `log_file` for the block (None: leave everything as it is)."""
    if log_file is None:
        yield
        return
    log_file.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    terminal = {fd: os.fdopen(os.dup(saved[fd]), "w", buffering=1, closefd=True) for fd in (1, 2)}
    previous = [(console, console.file) for console in keep]
    with open(log_file, "a", encoding="utf-8") as log:
        log.write(f"--- {datetime.now(timezone.utc).isoformat(timespec='seconds')} pid {os.getpid()}\n")
        log.flush()
        for console in keep:
            console.file = terminal[2 if console.stderr else 1]
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd in (1, 2):
                os.dup2(saved[fd], fd)
                os.close(saved[fd])
            for console, file in previous:
                console.file = file
            for stream in terminal.values():
                stream.close()


def log_file_beside(store_path: Path) -> Path:
    """Where a run's third-party output goes: next to its store (`results.sqlite` -> `results.log`)."""
    return Path(store_path).with_suffix(".log")
