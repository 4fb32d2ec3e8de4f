"""`merge-harness eval MODEL --tasks ...`: one model, lm-eval's settings, lm-eval's numbers.

The options mirror `lm_eval`'s (`--apply-chat-template`, `--num-fewshot`, `--gen-kwargs`, ...); the
job runs through the same path as `run` (`merge_harness.run.runner.run_jobs`), so its result is keyed, stored
and reused like any experiment job. `--output-path` writes lm-eval's results JSON as well.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import typer
from rich.markup import escape

from merge_harness.cli.common import console, err_console
from merge_harness.core.errors import ConfigError


def parse_gen_kwargs(text: str | None) -> dict | None:
    """`max_gen_toks=64,temperature=0` (lm-eval's syntax) or a JSON object -> a dict."""
    if not text:
        return None
    if text.lstrip().startswith("{"):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--gen-kwargs: invalid JSON: {exc}") from exc
        if not isinstance(value, dict):
            raise ConfigError("--gen-kwargs: expected a JSON object or key=value pairs")
        return value
    from lm_eval.utils import simple_parse_args_string

    try:
        return simple_parse_args_string(text)
    except ValueError as exc:
        raise ConfigError(f"--gen-kwargs: cannot parse {text!r} (try max_gen_toks=64,temperature=0)") from exc


def parse_batch_size(text: str) -> int | str:
    """'8' -> 8; 'auto' and 'auto:N' (lm-eval's own search) stay strings."""
    if text.isdigit() and int(text) > 0:
        return int(text)
    if text == "auto" or re.fullmatch(r"auto:\d+", text):
        return text
    raise ConfigError(f"--batch-size: expected a positive integer, 'auto' or 'auto:N', got {text!r}")


def parse_limit(limit: float | None) -> int | float | None:
    """5 or 5.0 -> 5 examples per task (so the job key is the YAML's); 0.1 -> a tenth of each task."""
    if limit is not None and limit >= 1:
        if limit != int(limit):
            raise ConfigError(f"--limit: {limit:g} is neither a count (>= 1, whole) nor a fraction (< 1)")
        return int(limit)
    return limit


def eval_model(
    model: str = typer.Argument(
        ..., help="A local model directory or a HF model id (org/name, or org/name@revision)."
    ),
    tasks: str = typer.Option(..., "--tasks", help="Comma-separated task names (ours or lm-eval's)."),
    apply_chat_template: bool = typer.Option(
        None,
        "--apply-chat-template/--no-apply-chat-template",
        help="Wrap prompts in the tokenizer's chat template. Default: on for chat tasks (their YAML "
        "sets metadata.apply_chat_template: true), off for the rest.",
        show_default=False,
    ),
    fewshot_as_multiturn: bool = typer.Option(
        False, "--fewshot-as-multiturn", help="Few-shot examples as chat turns (needs the chat template)."
    ),
    num_fewshot: int = typer.Option(
        None, "--num-fewshot", min=0, help="Few-shot examples per prompt (default: each task's own count)."
    ),
    gen_kwargs: str = typer.Option(
        None,
        "--gen-kwargs",
        help="Generation overrides, e.g. max_gen_toks=64,temperature=0 or a JSON object.",
    ),
    batch_size: str = typer.Option("1", "--batch-size", help="Batch size: an integer, 'auto' or 'auto:N'."),
    device: str = typer.Option("cpu", "--device", help="Where the model runs: cpu, cuda, cuda:1, ..."),
    limit: float = typer.Option(None, "--limit", help="Examples per task (< 1: that fraction of each task)."),
    log_samples: bool = typer.Option(
        False, "--log-samples", help="Keep lm-eval's per-sample log in the store."
    ),
    output_path: Path = typer.Option(
        None, "--output-path", help="Also write lm-eval's results JSON: a FILE.json, or a directory."
    ),
    store_path: str = typer.Option(
        None, "--store", help="SQLite result store (default .merge-harness/results.sqlite)."
    ),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """Evaluate one model on some tasks with lm-eval, as `lm_eval --model hf` would, and store the
    result; a result already stored for the same weights and settings is reused."""
    from merge_harness.evaluate.evaluator import (
        EvalSettings,
        chat_template_warnings,
        check_backend,
        check_tasks,
    )
    from merge_harness.io.models import resolve_model
    from merge_harness.run.experiment import single_model_job
    from merge_harness.run.runner import run_jobs
    from merge_harness.store.database import DEFAULT_STORE_PATH, ResultStore

    settings = EvalSettings(
        limit=parse_limit(limit),
        num_fewshot=num_fewshot,
        batch_size=parse_batch_size(batch_size),
        apply_chat_template=apply_chat_template,
        fewshot_as_multiturn=fewshot_as_multiturn,
        gen_kwargs=parse_gen_kwargs(gen_kwargs),
        log_samples=log_samples,
        device=device,
    )
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    check_backend(settings.backend)
    check_tasks(names)  # bad input fails before the store file is created
    resolve_model(model)
    with ResultStore(store_path or DEFAULT_STORE_PATH) as store:
        job = single_model_job(model, names, settings, store)
        for warning in chat_template_warnings(names, settings):
            err_console.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False)
        summary = run_jobs("eval", [job], store, show_progress=not quiet)
        results = [store.get_result(t.key) for t in job.tasks]
    if summary.elsewhere_unfinished:
        err_console.print(
            f"[yellow]warning:[/] {summary.elsewhere_unfinished} task(s) are being evaluated by another "
            "runner on this store; run `eval` again when it is done", highlight=False,
        )
        results = [result for result in results if result is not None]
    for label, task, error in summary.failed:
        err_console.print(f"[bold red]error:[/] {escape(label)} / {task}: {escape(error)}", highlight=False)
    if summary.failed:
        raise typer.Exit(2)
    print_scores(results)
    stored = "reused from" if summary.computed == 0 else "stored in"
    console.print(f"{summary.computed} computed, {summary.reused} reused; results {stored} {store.path}")
    if output_path is not None:
        write_lmeval_output(results, model, settings, output_path)


def print_scores(results) -> None:
    for result in results:
        for score in result.scores:
            stderr = f" ± {score.stderr:.4g}" if score.stderr is not None else ""
            console.print(f"{score.task:28} {score.metric:28} {score.value:.4g}{stderr}")


def write_lmeval_output(results, model: str, settings, output_path: Path) -> None:
    """lm-eval's results JSON of stored results, with how they were run and their job keys."""
    from merge_harness.evaluate.evaluator import lmeval_results_json, write_lmeval_json

    config = {
        "model": "hf",
        "model_args": f"pretrained={model}",
        **settings.model_dump(mode="json"),
        "job_keys": {r.spec["task"]: r.key for r in results},
    }
    console.print(f"written: {write_lmeval_json(lmeval_results_json(results, config), output_path, model)}")
