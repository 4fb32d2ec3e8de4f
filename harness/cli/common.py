"""What every command shares: the one-line error policy, the global options, consoles, the store
and table printing. Command modules (app, eval, analyze) import this, never each other."""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from merge_harness.core.allocator import exit_without_teardown
from merge_harness.core.errors import ConfigError, HarnessError


@dataclass(frozen=True)
class Options:
    """The global options (`merge-harness --debug --threads N ...`), handed to each command as
    `ctx.obj` and passed on explicitly from there."""

    debug: bool = False
    threads: int | None = None  # None: the command's own default (e.g. one thread on the toy zoo)
    exit_fast: bool = False  # end the process without interpreter teardown once the command succeeds


def options(ctx: typer.Context) -> Options:
    """The global options of this invocation (defaults when a command runs without the callback)."""
    return ctx.find_root().obj or Options()


console = Console(soft_wrap=True)
err_console = Console(stderr=True)


class HarnessApp(typer.Typer):
    """A Typer app that prints every error as one line: `HarnessError`s and missing packages
    exit 2, anything else (a bug) exits 1 with a hint to rerun with --debug for the traceback."""

    options = Options()  # replaced by the callback for each invocation

    def __call__(self, *args, **kwargs):
        try:
            return super().__call__(*args, **kwargs)
        except SystemExit as done:  # how click ends every command, successful or not
            if done.code in (0, None) and self.options.exit_fast:
                exit_without_teardown(0)
            raise
        except Exception as exc:
            if self.options.debug:
                raise
            error = one_line_error(exc)
            err_console.print(f"[bold red]error:[/] {escape(str(error))}", highlight=False, soft_wrap=True)
            sys.exit(error.exit_code if isinstance(error, HarnessError) else 1)


def one_line_error(exc: Exception) -> Exception:
    """A HarnessError as it is; a missing module as the package and extra to install; else a bug."""
    from merge_harness.core.extras import missing_package_error

    if isinstance(exc, HarnessError):
        return exc
    own = ("merge_harness",)  # a module of ours missing is a bug, not an install step
    if isinstance(exc, ModuleNotFoundError) and (exc.name or "").split(".")[0] not in own:
        return missing_package_error(exc)
    text = str(exc).strip().splitlines()
    return RuntimeError(
        f"internal error: {type(exc).__name__}: {text[0] if text else ''} "
        "(a bug in merge-harness; rerun with --debug for the traceback)"
    )


def parse_size(text: str) -> int:
    """'500MB', '2GB', '1.5GiB' or a plain byte count -> bytes."""
    match = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(i?B)?\s*", text, re.IGNORECASE)
    if not match:
        raise ConfigError(f"--max-shard-size: cannot parse size {text!r} (try 500MB or 2GB)")
    number, unit, suffix = float(match.group(1)), match.group(2).upper(), match.group(3) or ""
    base = 1024 if suffix.lower() == "ib" else 1000
    return int(number * base ** " KMGT".index(unit or " "))


def parse_kmb(text: str, option: str) -> int:
    """mergekit's size units: a byte count with K, M or B for 1e3, 1e6, 1e9 ('5B' = 5e9 bytes)."""
    match = re.fullmatch(r"\s*(\d+)\s*([KMB]?)\s*", text, re.IGNORECASE)
    if not match:
        raise ConfigError(f"{option}: cannot parse size {text!r} (mergekit's units: 500M, 5B)")
    return int(match.group(1)) * 1000 ** " KMB".index(match.group(2).upper() or " ")


def default_store_path() -> str:
    from merge_harness.store.database import DEFAULT_STORE_PATH

    return str(DEFAULT_STORE_PATH)


def open_store(path: str | None):
    from merge_harness.store.database import ResultStore

    return ResultStore(path or default_store_path())


def format_cell(value) -> str:
    if isinstance(value, float):
        return "-" if value != value else f"{value:.4g}"
    return "" if value is None else str(value)


PIPED_WIDTH = 10_000  # columns: wider than any table we print, and a table never pads to it


def print_table(table: Table) -> None:
    """A rich table on stdout. Piped or redirected, stdout has no width to fit, so the table is
    printed as wide as its cells need: no value is folded mid-token for a script to parse."""
    if console.is_terminal:
        console.print(table)
    else:
        Console(width=PIPED_WIDTH, soft_wrap=True).print(table)


def print_frame(frame, title: str) -> None:
    """A results DataFrame as a rich table (rows = models, columns = task metrics)."""
    table = Table(title=title)
    table.add_column("model", style="bold", no_wrap=True)
    for column in frame.columns:  # headers are never cut: a task name is read in full
        table.add_column(str(column), justify="right", min_width=len(str(column)), overflow="fold")
    for label, row in frame.iterrows():
        table.add_row(str(label), *(format_cell(v) for v in row))
    print_table(table)


