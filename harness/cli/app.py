"""The `merge-harness` command line. Errors print as one line and exit 2 (`--debug` for traces)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from merge_harness.cli.common import (
    HarnessApp,
    Options,
    console,
    default_store_path,
    err_console,
    open_store,
    options,
    parse_kmb,
    parse_size,
    print_frame,
    print_table,
)
from merge_harness.core.errors import ConfigError

app = HarnessApp(
    name="merge-harness",
    help="Merge fine-tuned LLMs, evaluate them with lm-eval, and compare the methods.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


# Commands that end without interpreter teardown (a fifth of a 135M merge's time with torch
# loaded); the longer commands keep the normal shutdown, where it does not show.
EXIT_FAST_COMMANDS = frozenset({"merge"})


@app.callback()
def main(
    ctx: typer.Context,
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors."),
    threads: int = typer.Option(
        None, "--threads", min=1, help="torch CPU threads for the whole command (default: torch's choice)."
    ),
) -> None:
    exit_fast = ctx.invoked_subcommand in EXIT_FAST_COMMANDS
    ctx.obj = app.options = Options(debug=debug, threads=threads, exit_fast=exit_fast)
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


def describe_params(model) -> str:
    """'name=default, ...' for a parameter model, in declaration order."""
    parts = []
    for name, field in model.model_fields.items():
        default = "required" if field.is_required() else repr(field.default)
        parts.append(f"{field.alias or name}={default}")
    return ", ".join(parts)


def methods_markdown() -> str:
    """The methods table of docs/methods.md, generated from the registry's metadata."""
    from merge_harness.merge.methods import method_registry

    lines = [
        "| method | kind | parameters | per-model parameters | equation | paper |",
        "|---|---|---|---|---|---|",
    ]
    for name, method in method_registry().items():
        kind = "per tensor" if method.streaming else "calibrated"
        cells = (name, kind, describe_params(method.params), describe_params(method.model_params))
        lines.append("| " + " | ".join((*cells, f"`{method.equation}`", method.paper)) + " |")
    return "\n".join(lines) + "\n"


def describe_params_json(model) -> list[dict]:
    """Each parameter of a parameter model as JSON: name, required, default, then its JSON schema
    (type or enum, bounds, description), in declaration order."""
    properties = model.model_json_schema(by_alias=True)["properties"]
    parameters = []
    for name, field in model.model_fields.items():
        schema = {k: v for k, v in properties[field.alias or name].items() if k not in ("title", "default")}
        required = field.is_required()
        default = None if required else properties[field.alias or name].get("default")
        parameters.append({"name": field.alias or name, "required": required, "default": default, **schema})
    return parameters


def methods_json() -> str:
    """One JSON object per registered method: what `merge-harness methods --format json` prints."""
    import json

    from merge_harness.merge.methods import method_registry

    methods = [
        {"name": name, "kind": "per tensor" if method.streaming else "calibrated", "base": method.base_role,
         "description": method.description, "paper": method.paper, "equation": method.equation,
         "parameters": describe_params_json(method.params),
         "per_model_parameters": describe_params_json(method.model_params)}
        for name, method in method_registry().items()
    ]
    return json.dumps(methods, indent=2) + "\n"


METHOD_FORMATS = ("table", "json", "markdown")


@app.command()
def methods(
    fmt: str = typer.Option(None, "--format", help="table (default), json or markdown."),
    markdown: bool = typer.Option(False, "--markdown", help="= --format markdown (docs/methods.md's table)."),
) -> None:
    """List the registered merge methods with their parameters and defaults."""
    from merge_harness.merge.methods import method_registry

    if markdown and fmt not in (None, "markdown"):
        raise ConfigError(f"--markdown and --format {fmt} disagree: give one")
    fmt = "markdown" if markdown else fmt or "table"
    if fmt not in METHOD_FORMATS:
        raise ConfigError(f"--format: {fmt!r} is not one of {', '.join(METHOD_FORMATS)}")
    if fmt != "table":
        typer.echo(methods_markdown() if fmt == "markdown" else methods_json(), nl=False)
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
    print_table(table)


# mergekit-yaml options that have no counterpart here: refused in one line, never silently.
MERGEKIT_UNSUPPORTED = {
    "--trust-remote-code": "remote code is never run",
    "--lora-merge-cache": "LoRA inputs are not supported",
    "--lora-merge-dtype": "LoRA inputs are not supported",
    "--transformers-cache": "set HF_HOME instead",
    "--low-cpu-memory": "merges always stream one tensor per input",
    "--clone-tensors": "tensors are never shared between outputs",
    "--no-safe-serialization": "output is always safetensors",
    "--read-to-gpu": "use --cuda (inputs are moved per tensor)",
    "--multi-gpu": "one device per merge",
    "--gpu-rich": "one device per merge",
    "--async-write": "writes already overlap reads",
    "--write-threads": "writes already overlap reads",
    "--unsafe-truncate-embeddings": "vocabularies must match",
    "--num-threads": "use the global option: merge-harness --threads N merge ...",
}
MERGEKIT_NO_EFFECT = {
    "--lazy-unpickle": "tensors are always read lazily",
    "--safe-serialization": "output is always safetensors",
}


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def merge(
    ctx: typer.Context,
    config: Path = typer.Argument(..., help="Merge YAML (ours or mergekit's format)."),
    out: Path = typer.Argument(..., help="Output model directory."),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty output directory."),
    device: str = typer.Option(None, "--device", help="cpu or cuda (overrides the config)."),
    cuda: bool = typer.Option(False, "--cuda", help="Merge on the GPU (mergekit's flag; = --device cuda)."),
    dtype: str = typer.Option(None, "--dtype", help="Output dtype (overrides the config)."),
    max_shard_size: str = typer.Option(None, "--max-shard-size", help="e.g. 500MB, 2GB (default 2GB)."),
    out_shard_size: str = typer.Option(
        None, "--out-shard-size", help="mergekit's units: bytes with K/M/B = 1e3/1e6/1e9, e.g. 5B."
    ),
    copy_tokenizer: bool = typer.Option(True, "--copy-tokenizer/--no-copy-tokenizer",
                                        help="Copy the tokenizer next to the weights."),
    write_model_card: bool = typer.Option(True, "--write-model-card/--no-write-model-card",
                                          help="Write README.md (HF model card)."),
    random_seed: int = typer.Option(None, "--random-seed", help="Seed of random methods (overrides config)."),
    allow_crimes: bool = typer.Option(False, "--allow-crimes",
                                      help="Merge different architectures whose tensors match."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """Merge models as CONFIG says and write a Hugging Face model directory to OUT.

    Takes mergekit-yaml's options too; those without a counterpart say so and stop.
    """
    from merge_harness.core.allocator import keep_freed_memory
    from merge_harness.merge.config import load_merge_config
    from merge_harness.merge.engine import DEFAULT_SHARD_BYTES, merge_to_disk

    keep_freed_memory()  # blocks are reused instead of faulted in afresh (merge_harness.core.allocator)
    for arg in ctx.args:
        option = arg.split("=", 1)[0]
        if option in MERGEKIT_UNSUPPORTED:
            raise ConfigError(f"{option}: not supported by merge-harness ({MERGEKIT_UNSUPPORTED[option]})")
        if option not in MERGEKIT_NO_EFFECT:
            raise ConfigError(f"no such option: {arg} (see merge-harness merge --help)")
        err_console.print(f"[yellow]note:[/] {option}: accepted, no effect ({MERGEKIT_NO_EFFECT[option]})")
    if max_shard_size and out_shard_size:
        raise ConfigError("--max-shard-size and --out-shard-size both set the shard size: give one")
    shard_bytes = (parse_kmb(out_shard_size, "--out-shard-size") if out_shard_size
                   else parse_size(max_shard_size) if max_shard_size else DEFAULT_SHARD_BYTES)
    merge_config = load_merge_config(config)
    if cuda and device is not None and not device.startswith("cuda"):
        raise ConfigError(f"--cuda and --device {device} disagree: give one")
    overrides = {"device": device or ("cuda" if cuda else None), "out_dtype": dtype, "seed": random_seed}
    updates = {k: v for k, v in overrides.items() if v is not None}
    if updates:
        merge_config = merge_config.model_validate({**merge_config.model_dump(by_alias=True), **updates})
    outcome = merge_to_disk(
        merge_config, out, force=force, max_shard_bytes=shard_bytes, show_progress=not quiet,
        copy_tokenizer=copy_tokenizer, write_model_card=write_model_card, allow_crimes=allow_crimes,
    )
    for note in outcome.notes:
        err_console.print(f"[yellow]note:[/] {escape(note)}", highlight=False)
    console.print(
        f"merged {outcome.tensors} tensors with [bold]{merge_config.method}[/] in "
        f"{outcome.seconds:.1f} s -> {outcome.out_dir}"
    )


def dry_run_listing(experiment, store_path: str) -> None:
    """Validate an experiment and list its jobs; weights absent here are validated by reference.

    Creates nothing: an existing store is only read, to count the finished jobs.
    """
    from merge_harness.io.models import ModelNotFound
    from merge_harness.run.experiment import plan_jobs, resolve_models, validate_experiment

    try:
        resolve_models(experiment)
    except ModelNotFound as exc:
        console.print(f"[yellow]weights not available here ({exc}); validating the config only[/]")
        jobs, identified = plan_jobs(experiment, None, identify=False), False
    else:
        jobs, identified = validate_experiment(experiment), Path(store_path).exists()
    if identified:
        with open_store(store_path) as store:
            jobs = plan_jobs(experiment, store)
            finished = [sum(store.has_result(t.key) for t in job.tasks) for job in jobs]
    else:
        finished = [0] * len(jobs)
    for job, done in zip(jobs, finished):
        console.print(f"{job.kind:8} {job.label}: {len(job.tasks)} tasks ({done} finished)")
    console.print(f"{experiment.name}: valid; {sum(len(j.tasks) for j in jobs)} jobs in {len(jobs)} models")


@app.command()
def run(
    ctx: typer.Context,
    experiment_file: Path = typer.Argument(..., help="Experiment YAML."),
    store_path: str = typer.Option(None, "--store", help="SQLite result store (default from the YAML)."),
    executor: str = typer.Option("local", "--executor", help="local or ray."),
    address: str = typer.Option(None, "--address", help="Ray cluster address (default: local Ray)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate and list the jobs; run nothing."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
    seeds: list[int] = typer.Option(None, "--seed", help="Only this replicate of a `seeds:` experiment "
                                    "(repeatable; default: every seed)."),
    lease_s: float = typer.Option(
        120.0, "--lease-s", min=1.0,
        help="Claim lease: a job held by a runner without a heartbeat for this long is taken over.",
    ),
) -> None:
    """Run every (model, task) job of an experiment; finished jobs are reused, never recomputed.

    Several runners on one store share the work: each job is claimed, so it is computed once.
    """
    from merge_harness.evaluate.evaluator import chat_template_warnings, check_backend
    from merge_harness.run.experiment import load_experiments, validate_experiment
    from merge_harness.run.runner import make_executor

    experiments = load_experiments(experiment_file)  # several with `seeds:`, run one after another
    if seeds:
        experiments = [e for e in experiments if e.seed in seeds]
        if not experiments:
            raise ConfigError(f"{experiment_file}: --seed {seeds}: no replicate has that seed")
    first = experiments[0]
    chosen = make_executor(executor, address)
    if not dry_run:
        check_backend(first.evaluation.backend)  # before hashing, merging or evaluating anything
    for warning in chat_template_warnings([t.name for t in first.task_runs()], first.evaluation):
        err_console.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False)
    store_path = store_path or first.store or default_store_path()
    if dry_run:
        for experiment in experiments:
            dry_run_listing(experiment, store_path)
        return
    for experiment in experiments:
        validate_experiment(experiment)  # every bad input fails here, before the store file exists
    failed = 0
    with open_store(store_path) as store:
        for experiment in experiments:
            failed += run_one(ctx, experiment, store, chosen, quiet, lease_s)
    if failed:
        raise typer.Exit(1)


def run_one(ctx: typer.Context, experiment, store, executor, quiet: bool, lease_s: float) -> int:
    """Run one experiment on an open store and print its table and summary; the failed job count."""
    from merge_harness.core.third_party import log_file_beside
    from merge_harness.run.runner import run_experiment, summary_frame

    summary = run_experiment(experiment, store, executor, show_progress=not quiet, lease_s=lease_s,
                             quiet_third_party=not options(ctx).debug)
    frame = summary_frame(store, experiment.name, summary.labels)
    if not frame.empty:
        print_frame(frame.round(1), f"{experiment.name} ({store.path}): each task's primary metric, "
                    "in points (0-100; BLEU as is)")
    elsewhere = f"{summary.elsewhere} held by another runner, " if summary.elsewhere else ""
    console.print(
        f"{summary.total} jobs: {summary.reused} reused, {summary.computed} computed, "
        f"{elsewhere}{len(summary.failed)} failed in {summary.seconds:.1f} s"
    )
    if summary.computed and not options(ctx).debug:
        console.print(f"lm-eval's and other libraries' output: {log_file_beside(store.path)}")
    if summary.elsewhere_unfinished:
        console.print(f"{summary.elsewhere_unfinished} of them unfinished here: run again later for any left")
    for label, task, error in summary.failed:
        err_console.print(f"[red]failed[/] {label} / {task}: {error}", highlight=False)
    return len(summary.failed)


@app.command()
def report(
    experiment: str = typer.Option(None, "--experiment", help="Experiment name (default: all in the store)."),
    formats: str = typer.Option("all", "--format", help="md, latex, csv, json, html or all."),
    out: Path = typer.Option(Path("reports-out"), "--out", help="Directory for the files."),
    paper: str = typer.Option(None, "--paper", help="Paper-table spec: NAME in reports/paper/ or a path."),
    normalized: bool = typer.Option(False, "--normalized", help="Scores / the fine-tune's on its task."),
    delta: bool = typer.Option(False, "--delta", help="Scores minus task arithmetic's."),
    stderr: bool = typer.Option(None, "--stderr/--no-stderr",
                                help="'± stderr' after scores (default: in the leaderboard only)."),
    baseline: str = typer.Option(None, "--baseline",
                                 help="Row that Δ and the paired test compare with (default: TA)."),
    store_path: str = typer.Option(None, "--store", help="SQLite result store."),
) -> None:
    """Render comparison tables, the HTML leaderboard and plots from the result store."""
    from merge_harness.reports.commands import render_paper, write_paper, write_report

    with open_store(store_path) as store:
        if paper:
            console.print(render_paper(store, paper), markup=False, highlight=False)
            console.print(f"written: {write_paper(store, paper, out)}")
            return
        files = write_report(store, experiment, out, formats, normalized=normalized, delta=delta,
                             stderr=stderr, baseline=baseline)
    for path in files:
        console.print(f"written: {path}")


@app.command()
def check(
    golden: Path = typer.Option(..., "--golden", help="Golden results JSON (written by --update)."),
    experiment: str = typer.Option(None, "--experiment", help="Default: the golden file's experiment."),
    update: bool = typer.Option(False, "--update", help="Write the golden file from the store instead."),
    tolerance: float = typer.Option(0.5, "--tolerance", help="Allowed drop, in points (0-100 scale)."),
    tolerance_stderr: float = typer.Option(None, "--tolerance-stderr", help="Or K x the combined stderr."),
    junit: Path = typer.Option(None, "--junit", help="Write a JUnit XML report here."),
    summary: Path = typer.Option(None, "--summary", help="Write a Markdown summary here."),
    primary_only: bool = typer.Option(False, "--primary-only",
                                      help="Check each task's primary metric only (what tables report)."),
    store_path: str = typer.Option(None, "--store", help="SQLite result store."),
) -> None:
    """Compare the store's results with a golden file: exit 1 on a regression."""
    from merge_harness.reports.check import Tolerance
    from merge_harness.reports.commands import run_check

    limits = Tolerance(points=tolerance, stderr_multiple=tolerance_stderr)
    with open_store(store_path) as store:
        outcome = run_check(store, experiment, golden, limits, update=update, junit=junit, summary=summary,
                            primary_only=primary_only)
    console.print(outcome.summary_md, markup=False, highlight=False)
    if outcome.exit_code:
        raise typer.Exit(outcome.exit_code)


@app.command()
def finetune(
    config: Path = typer.Argument(..., help="Fine-tune YAML (see docs/finetune.md)."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar (step, loss, learning rate)."),
) -> None:
    """Supervised fine-tuning (full, attention-only or MLP-only) into a HF model directory."""
    from merge_harness.train.finetune import finetune_from_config

    console.print(f"written: {finetune_from_config(config, show_progress=not quiet)}")


@app.command()
def demo(
    ctx: typer.Context,
    zoo: str = typer.Option("toy", "--zoo", help="toy (a tiny model built here) or smollm2 (real 135M)."),
    out: Path = typer.Option(Path("demo-out"), "--out", help="Where the zoo, store and report go."),
    size: str = typer.Option("toy", "--size", help="Toy zoo size: toy (the demo) or ci (seconds)."),
    zoo_dir: Path = typer.Option(None, "--zoo-dir", help="Zoo cache (default ~/.cache/merge-harness/zoo)."),
    limit: int = typer.Option(None, "--limit", help="Examples per task (default: all)."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
) -> None:
    """The offline demo: build a model zoo, merge with every method, evaluate, report."""
    import time

    from merge_harness.core.third_party import log_file_beside
    from merge_harness.evaluate.evaluator import check_backend
    from merge_harness.reports.frame import comparison_frame
    from merge_harness.zoo.demo import ZOO_CACHE, run_demo

    check_backend("hf")  # fail fast: before building the zoo and merging
    start = time.perf_counter()
    result = run_demo(out, zoo, size, not quiet, zoo_dir or ZOO_CACHE, limit, options(ctx).threads)
    from merge_harness.store.database import ResultStore

    with ResultStore(result.store) as store:
        frame = comparison_frame(store, result.experiment)
    hidden = ("kind", "method", "hyper-parameters", "Merge (s)", "Peak RSS (MB)")  # all in the report
    extra = (" (se)", " (p vs baseline)")  # the report has them; the console shows the scores
    scores = frame.drop(columns=[c for c in frame.columns if c in hidden or c.endswith(extra)])
    print_frame(scores.round(1), f"{result.experiment}: scores in points (0-100; BLEU for translation)")
    summary = result.summary
    console.print(f"{summary.total} jobs: {summary.reused} reused, {summary.computed} computed")
    console.print(f"store: {result.store}")
    console.print(f"lm-eval's and other libraries' output: {log_file_beside(result.store)}")
    for path in result.files:
        console.print(f"written: {path}")
    console.print(f"demo finished in {time.perf_counter() - start:.0f} s")


def _register_subcommands() -> None:
    from merge_harness.cli.analyze import analyze_app
    from merge_harness.cli.eval import eval_model
    from merge_harness.cli.results import results_app
    from merge_harness.cli.study import study_app

    app.command("eval")(eval_model)
    app.add_typer(analyze_app, name="analyze")
    app.add_typer(results_app, name="results")
    app.add_typer(study_app, name="study")


_register_subcommands()
