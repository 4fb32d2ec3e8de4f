"""`merge-harness results ...`: the store's results out to a file, and another store's in.

- `export`: csv and parquet hold the store's results frame (`ResultStore.results_frame`: one row
  per job, task and metric); jsonl holds each job's whole record (`ResultStore.export_jsonl`), the
  format `import` reads back losslessly. Every file is written to a temporary name and renamed.
- `import`: pools a jsonl export into a store (`ResultStore.import_jsonl`). Keys stay content
  hashes: a job already stored with the same content is skipped, one stored with other content is
  a conflict, reported and never overwritten.

Bad input (an unknown name, a malformed line, a missing store) is one line and exit 2, and
nothing is written. Conflicts exit 1: the input was valid, but not all of it was pooled.
"""

from __future__ import annotations

import difflib
import io
from pathlib import Path

import typer
from rich.markup import escape

from merge_harness.cli.common import console, default_store_path, err_console, open_store
from merge_harness.core.errors import ConfigError

FORMATS = ("csv", "jsonl", "parquet")
FILTERS = (("--model", "label"), ("--task", "task"), ("--metric", "metric"))  # option, frame column

results_app = typer.Typer(help="Export the store's results (csv, jsonl, parquet) or import another store's.")


def export_format(fmt: str | None, out: Path) -> str:
    """--format, or the suffix of --out when it is not given."""
    chosen = fmt or out.suffix.lstrip(".").lower()
    if chosen not in FORMATS:
        given = f"{fmt!r} is not" if fmt else f"cannot tell the format from {out.name!r}: give"
        raise ConfigError(f"--format: {given} one of {', '.join(FORMATS)}")
    return chosen


def require_pyarrow() -> None:
    """Parquet needs pyarrow (the `parquet` extra): a one-line error before anything is opened."""
    from merge_harness.core.extras import missing_package_error

    try:
        import pyarrow  # noqa: F401
    except ImportError as exc:
        raise missing_package_error(exc, "results export --format parquet") from exc


def existing_store(store_path: str | None, out: Path) -> str:
    """The store to export from: it must exist (exporting never creates one) and is never --out."""
    path = store_path or default_store_path()
    if not Path(path).is_file():
        raise ConfigError(f"no result store at {path}; pass --store PATH")
    if out.resolve() == Path(path).resolve():
        raise ConfigError(f"--out {out} is the result store itself; write the export elsewhere")
    if out.is_dir():
        raise ConfigError(f"--out {out} is a directory; give a file name")
    return path


def unknown(option: str, name: str, known: list[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return ConfigError(f"{option} {name!r}: not in {where}{hint} (there: {', '.join(known) or 'none'})")


def select_rows(frame, chosen: dict[str, list[str]], where: str):
    """The rows of `frame` whose label, task and metric are among those chosen (all when none).

    Every chosen name must occur in `frame`; a choice that leaves no row is an error too.
    """
    for option, column in FILTERS:
        known = sorted(set(frame[column]))
        for name in chosen[option]:
            if name not in known:
                raise unknown(option, name, known, where)
    for option, column in FILTERS:
        if chosen[option]:
            frame = frame[frame[column].isin(chosen[option])]
    if frame.empty:
        given = " ".join(f"{option} {name}" for option, _ in FILTERS for name in chosen[option])
        raise ConfigError(f"no result in {where} matches {given}; nothing written")
    empty = [c for c in frame.columns if c.startswith(("param_", "time_")) and frame[c].isna().all()]
    return frame.drop(columns=empty).reset_index(drop=True)


def parquet_safe(frame):
    """Object columns holding mixed types (a parameter that is a number in one job and a list,
    as JSON text, in another) as text: parquet needs one type per column."""
    frame = frame.copy()
    for column in frame.select_dtypes(include="object").columns:
        kinds = {type(v) for v in frame[column] if v is not None and v == v}
        if len(kinds) > 1:
            frame[column] = [None if v is None or v != v else str(v) for v in frame[column]]
    return frame


def write_frame(frame, out: Path, fmt: str) -> None:
    from merge_harness.core.atomic import atomic_write_bytes, atomic_write_text

    if fmt == "csv":
        atomic_write_text(out, frame.to_csv(index=False))
        return
    buffer = io.BytesIO()
    parquet_safe(frame).to_parquet(buffer, index=False)
    atomic_write_bytes(out, buffer.getvalue())


@results_app.command("export")
def results_export(
    out: Path = typer.Option(..., "--out", help="The file to write (replaced atomically)."),
    fmt: str = typer.Option(None, "--format", help="csv, jsonl or parquet (default: --out's suffix)."),
    experiment: str = typer.Option(None, "--experiment", help="Only this experiment's jobs."),
    models: list[str] = typer.Option([], "--model", help="Only this model label (repeatable)."),
    tasks: list[str] = typer.Option([], "--task", help="Only this task (repeatable; csv/parquet)."),
    metrics: list[str] = typer.Option([], "--metric", help="Only this metric (repeatable; csv/parquet)."),
    store_path: str = typer.Option(None, "--store", help="SQLite result store."),
) -> None:
    """Write the store's results to a csv, jsonl or parquet file.

    csv and parquet: one row per job, task and metric. jsonl: one whole job per line, which
    `results import` reads back on another machine.
    """
    fmt = export_format(fmt, out)
    if fmt == "jsonl" and (tasks or metrics):
        raise ConfigError("--task/--metric select rows of csv or parquet; a jsonl export holds whole "
                          "jobs (select them with --experiment and --model)")
    if fmt == "parquet":
        require_pyarrow()
    path = existing_store(store_path, out)
    with open_store(path) as store:
        if experiment is not None and experiment not in store.experiment_names():
            raise unknown("--experiment", experiment, store.experiment_names(), path)
        where = f"{path}" + (f" (experiment {experiment!r})" if experiment else "")
        rows = select_rows(store.results_frame(experiment),
                           {"--model": models, "--task": tasks, "--metric": metrics}, where)
        if fmt == "jsonl":
            count, what = store.export_jsonl(out, experiment, models), "job records"
        else:
            write_frame(rows, out, fmt)
            count, what = len(rows), "rows"
    console.print(f"written: {out} ({count} {what})", highlight=False)


@results_app.command("import")
def results_import(
    file: Path = typer.Argument(..., help="A jsonl file from `merge-harness results export`."),
    store_path: str = typer.Option(None, "--store", help="SQLite result store (created if absent)."),
) -> None:
    """Pool a jsonl export (another machine's results) into a store.

    New jobs are added, identical ones skipped; a job stored with other scores is a conflict:
    reported, the stored result kept, and the command exits 1.
    """
    from merge_harness.store.results_file import read_results_jsonl

    results = read_results_jsonl(file)  # every line checked before any store is opened
    with open_store(store_path) as store:
        outcome = store.import_jsonl(results)
    for conflict in outcome.conflicts:
        err_console.print(f"[yellow]conflict:[/] {escape(f'{file}:{conflict.line}: {conflict}')}",
                          highlight=False, soft_wrap=True)
    console.print(
        f"{file} -> {store.path}: {outcome.imported} imported, {outcome.skipped} skipped "
        f"(already stored), {len(outcome.conflicts)} conflicts", highlight=False, markup=False,
    )
    if outcome.conflicts:
        raise typer.Exit(1)
