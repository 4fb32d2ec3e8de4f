"""`merge-harness analyze ...`: the diagnostics of harness/diagnostics on an experiment's models."""

from __future__ import annotations

import math
from pathlib import Path

import typer
from rich.markup import escape

from merge_harness.cli.common import console, err_console, options
from merge_harness.core.errors import ConfigError

TEMPLATE = typer.Option(
    "chat", "--template", help="chat | fastchat | plain: how the fine-tunes saw their data."
)


analyze_app = typer.Typer(help="Diagnostics: why a merge works (linearity, disentanglement, search).")


def experiment_models(path: Path) -> tuple[str, dict[str, str], dict[str, str]]:
    """(base, {fine-tune: model}, {fine-tune: calibration data}) of an experiment YAML."""
    from merge_harness.run.experiment import load_experiment

    experiment = load_experiment(path)
    missing = [name for name, ft in experiment.finetunes.items() if not ft.calibration]
    if missing:
        raise ConfigError(f"{path}: finetunes {missing} need `calibration:` data (a train JSONL or task)")
    models = {name: ft.model for name, ft in experiment.finetunes.items()}
    data = {name: ft.calibration.source for name, ft in experiment.finetunes.items()}
    return experiment.base_model, models, data


def print_written(files) -> None:
    for path in files:
        console.print(f"written: {path}")


@analyze_app.command("linearity")
def analyze_linearity(
    experiment_file: Path = typer.Argument(..., help="Experiment YAML (base, fine-tunes, calibration)."),
    out: Path = typer.Option(Path("diagnostics"), "--out"),
    num_samples: int = typer.Option(16, "--num-samples", help="Calibration examples per task."),
    template: str = TEMPLATE,
) -> None:
    """Non-linearity of decoder layers, attention and MLP blocks vs the whole model, per task."""
    from merge_harness.diagnostics.linearity import linearity_report
    from merge_harness.selection.answers import DataSettings

    base, models, data = experiment_models(experiment_file)
    _, files = linearity_report(
        base, models, data, out, data=DataSettings(num_samples=num_samples, template=template)
    )
    print_written(files)


@analyze_app.command("disentanglement")
def analyze_disentanglement(
    experiment_file: Path = typer.Argument(..., help="Experiment YAML (base, fine-tunes, calibration)."),
    compare: list[Path] = typer.Option([], "--compare", help="Experiments with other fine-tunes."),
    out: Path = typer.Option(Path("diagnostics"), "--out"),
    num_samples: int = typer.Option(16, "--num-samples"),
    template: str = TEMPLATE,
) -> None:
    """Weight disentanglement error between task pairs over an alpha grid (heatmaps)."""
    from merge_harness.diagnostics.disentanglement import disentanglement_report
    from merge_harness.selection.answers import DataSettings

    base, models, data = experiment_models(experiment_file)
    variants = {experiment_file.stem: models}
    for other in compare:
        variants[other.stem] = experiment_models(other)[1]
    _, files = disentanglement_report(
        base, variants, data, out, data=DataSettings(num_samples=num_samples, template=template)
    )
    print_written(files)


def parse_grid(text: str) -> tuple[float, ...]:
    """'0,0.1,0.5' -> (0.0, 0.1, 0.5): finite numbers, at least one."""
    values = []
    for part in text.split(","):
        try:
            value = float(part)
        except ValueError:
            raise ConfigError(f"--grid: {part.strip()!r} is not a number (e.g. --grid 0,0.25,0.5)") from None
        if not math.isfinite(value):
            raise ConfigError(f"--grid: {part.strip()!r} is not a finite number")
        values.append(value)
    return tuple(values)


@analyze_app.command("search")
def analyze_search(
    experiment_file: Path = typer.Argument(..., help="Experiment YAML (base, fine-tunes, train data)."),
    method: str = typer.Option("task_arithmetic", "--method"),
    parameter: str = typer.Option("lambda", "--parameter"),
    grid: str = typer.Option(None, "--grid", help="Values to try, e.g. 0,0.25,0.5 (default 0, 0.05 .. 1)."),
    held_out_fraction: float = typer.Option(0.2, "--held-out", help="Part of each train file held out."),
    out: Path = typer.Option(Path("diagnostics"), "--out"),
    template: str = TEMPLATE,
) -> None:
    """Grid-search a method's scalar parameter on held-out TRAIN data (never the test split)."""
    from merge_harness.diagnostics.search_report import search_report
    from merge_harness.selection.answers import DataSettings
    from merge_harness.selection.grid import DEFAULT_GRID, check_grid, edge_warning
    from merge_harness.selection.search import SearchSpec

    values = parse_grid(grid) if grid is not None else DEFAULT_GRID
    check_grid(method, parameter, values, "--grid" if grid is not None else "the default grid (0 to 1)")
    base, models, data = experiment_models(experiment_file)
    spec = SearchSpec(method=method, parameter=parameter, grid=values)
    settings = DataSettings(held_out_fraction=held_out_fraction, template=template)
    result, files = search_report(base, models, data, out, spec=spec, data=settings)
    console.print(f"chosen {parameter} = {result.chosen} (score {result.best_score:.4g})")
    if warning := edge_warning(method, parameter, values, result.chosen):
        err_console.print(f"[yellow]warning:[/] {escape(warning)} (--grid)", highlight=False, soft_wrap=True)
    print_written(files)


@analyze_app.command("zoo")
def analyze_zoo(
    ctx: typer.Context,
    zoo: str = typer.Option("toy", "--zoo", help="toy (a tiny model built here) or smollm2 (real 135M)."),
    size: str = typer.Option("toy", "--size", help="Toy zoo size: toy or ci (seconds)."),
    out: Path = typer.Option(Path("diagnostics"), "--out"),
    zoo_dir: Path = typer.Option(None, "--zoo-dir", help="Zoo cache (default ~/.cache/merge-harness/zoo)."),
    variants: str = typer.Option(
        None, "--variants", help="e.g. full,attn_only,mlp_only (the zoo's own included; default: per zoo)."
    ),
) -> None:
    """Every diagnostic on a demo zoo (full / attention-only / MLP-only fine-tunes) + summary.md."""
    from dataclasses import replace

    from merge_harness.diagnostics.run_zoo import DIAGNOSTICS_PER_ZOO, run_zoo_diagnostics
    from merge_harness.io.models import torch_threads
    from merge_harness.zoo.demo import ZOO_CACHE, build_demo_zoo, zoo_threads

    built = build_demo_zoo(zoo, zoo_dir or ZOO_CACHE, size, show_progress=True)
    settings = DIAGNOSTICS_PER_ZOO[zoo]
    if variants:
        settings = replace(settings, variants=tuple(v.strip() for v in variants.split(",") if v.strip()))
    with torch_threads(zoo_threads(zoo, options(ctx).threads)):
        summary = run_zoo_diagnostics(built, out, settings, log=console.print)
    console.print(f"written: {summary}")
