"""The `merge-harness` command line. Errors print as one line and exit 2 (`--debug` for traces)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from harness.errors import ConfigError, HarnessError

console = Console()
err_console = Console(stderr=True)


class HarnessApp(typer.Typer):
    """A Typer app that turns `HarnessError`s into one-line messages and exit code 2."""

    debug = False

    def __call__(self, *args, **kwargs):
        try:
            return super().__call__(*args, **kwargs)
        except HarnessError as exc:
            if HarnessApp.debug:
                raise
            err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            sys.exit(exc.exit_code)


app = HarnessApp(
    name="merge-harness",
    help="Merge fine-tuned LLMs, evaluate them with lm-eval, and compare the methods.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def main(debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors.")) -> None:
    HarnessApp.debug = debug


def parse_size(text: str) -> int:
    """'500MB', '2GB', '1.5GiB' or a plain byte count -> bytes."""
    match = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(i?B)?\s*", text, re.IGNORECASE)
    if not match:
        raise ConfigError(f"--max-shard-size: cannot parse size {text!r} (try 500MB or 2GB)")
    number, unit, suffix = float(match.group(1)), match.group(2).upper(), match.group(3) or ""
    base = 1024 if suffix.lower() == "ib" else 1000
    return int(number * base ** " KMGT".index(unit or " "))


def describe_params(model) -> str:
    """'name=default, ...' for a parameter model, in declaration order."""
    parts = []
    for name, field in model.model_fields.items():
        default = "required" if field.is_required() else repr(field.default)
        parts.append(f"{field.alias or name}={default}")
    return ", ".join(parts)


def methods_markdown() -> str:
    """The methods table of docs/methods.md, generated from the registry's metadata."""
    from harness.methods import method_registry

    lines = [
        "| method | kind | parameters | per-model parameters | equation | paper |",
        "|---|---|---|---|---|---|",
    ]
    for name, method in method_registry().items():
        kind = "per tensor" if method.streaming else "calibrated"
        cells = (name, kind, describe_params(method.params), describe_params(method.model_params))
        lines.append("| " + " | ".join((*cells, f"`{method.equation}`", method.paper)) + " |")
    return "\n".join(lines) + "\n"


@app.command()
def methods(
    markdown: bool = typer.Option(False, "--markdown", help="Print the Markdown table of docs/methods.md."),
) -> None:
    """List the registered merge methods with their parameters and defaults."""
    from harness.methods import method_registry

    if markdown:
        typer.echo(methods_markdown(), nl=False)
        return
    table = Table(title="merge methods", show_lines=True)
    table.add_column("method", no_wrap=True, style="bold")
    table.add_column("kind", no_wrap=True)
    table.add_column("parameters = default  (per model: ...)")
    table.add_column("description")
    for name, method in method_registry().items():
        kind = "per tensor" if method.streaming else "calibrated"
        per_model = describe_params(method.model_params)
        text = describe_params(method.params) + (f"  (per model: {per_model})" if per_model else "")
        table.add_row(name, kind, text or "-", method.description)
    console.print(table)


@app.command()
def merge(
    config: Path = typer.Argument(..., help="Merge YAML (ours or mergekit's format)."),
    out: Path = typer.Argument(..., help="Output model directory."),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty output directory."),
    device: str = typer.Option(None, "--device", help="cpu or cuda (overrides the config)."),
    dtype: str = typer.Option(None, "--dtype", help="Output dtype (overrides the config)."),
    max_shard_size: str = typer.Option("2GB", "--max-shard-size", help="e.g. 500MB, 2GB."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """Merge models as CONFIG says and write a Hugging Face model directory to OUT."""
    from harness.config import load_merge_config
    from harness.engine import merge_to_disk

    merge_config = load_merge_config(config)
    updates = {k: v for k, v in {"device": device, "out_dtype": dtype}.items() if v}
    if updates:
        merge_config = merge_config.model_validate({**merge_config.model_dump(by_alias=True), **updates})
    outcome = merge_to_disk(
        merge_config, out, force=force, max_shard_bytes=parse_size(max_shard_size), show_progress=not quiet
    )
    console.print(
        f"merged {outcome.tensors} tensors with [bold]{merge_config.method}[/] in "
        f"{outcome.seconds:.1f} s -> {outcome.out_dir}"
    )
