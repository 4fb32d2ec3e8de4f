"""`merge-harness study ...`: the SLTA study (issue 18) — its zoo and its report.

The comparison itself is an ordinary experiment, `merge-harness run experiments/slta_study.yaml`.
"""

from __future__ import annotations

from pathlib import Path

import typer

from merge_harness.cli.common import console, open_store, options

study_app = typer.Typer(help="The SLTA study: build its zoo, report its replicated results.")


def _numbers(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(",") if part.strip())


def _names(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


@study_app.command("zoo")
def study_zoo(
    ctx: typer.Context,
    out: Path = typer.Option(Path("study-zoo"), "--out", help="Where the <variant>-seed<N> links go."),
    zoo_dir: Path = typer.Option(None, "--zoo-dir", help="Zoo cache (default ~/.cache/merge-harness/zoo)."),
    seeds: str = typer.Option("0,1,2", "--seeds", help="Training seeds."),
    variants: str = typer.Option("full,attn_only", "--variants", help="full and/or attn_only."),
    size: str = typer.Option("smollm2", "--size", help="smollm2 (the study) or ci (a tiny base, seconds)."),
) -> None:
    """Fine-tune SmolLM2-135M-Instruct on the study's three tasks, per variant and seed (cached)."""
    from merge_harness.core.third_party import third_party_output_to
    from merge_harness.io.models import torch_threads
    from merge_harness.zoo.demo import ZOO_CACHE
    from merge_harness.zoo.study import build_study_zoos

    out.mkdir(parents=True, exist_ok=True)
    with third_party_output_to(out / "build.log", keep=[console]), torch_threads(options(ctx).threads):
        zoos = build_study_zoos(out, zoo_dir or ZOO_CACHE, _names(variants), _numbers(seeds), size)
    for name, zoo in zoos.items():
        console.print(f"{out / name} -> {zoo.root}")


@study_app.command("report")
def study_report(
    ctx: typer.Context,
    name: str = typer.Option("slta-study", "--experiment", help="The replicated experiment's name."),
    store_path: str = typer.Option(None, "--store", help="Its SQLite result store."),
    zoo: Path = typer.Option(Path("study-zoo"), "--zoo", help="The study zoo (for attention-only models)."),
    out: Path = typer.Option(Path("slta-study-report"), "--out"),
    residuals: bool = typer.Option(True, "--residuals/--no-residuals", help="Held-out residuals (minutes)."),
    disentanglement: bool = typer.Option(True, "--disentanglement/--no-disentanglement",
                                         help="Full vs attention-only disentanglement error (minutes)."),
) -> None:
    """Tables over seeds (mean ± 95% interval), paired tests, plots, residuals, disentanglement."""
    from merge_harness.diagnostics.slta_study import write_study_report
    from merge_harness.io.models import torch_threads

    with open_store(store_path) as store, torch_threads(options(ctx).threads):
        files = write_study_report(store, name, zoo if disentanglement else None, out, residuals,
                                   disentanglement)
    for path in files:
        console.print(f"written: {path}")
