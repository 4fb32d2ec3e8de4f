"""Run an experiment: skip finished jobs, build each model once, evaluate, record job by job.

A model (pre-trained, fine-tune, or merge) is built only if one of its tasks is unfinished; merges
happen in memory. Each task's result is committed to the store as soon as it exists, so a run
killed at any point restarts where it stopped and never recomputes or overwrites a finished job.
The executor decides where model jobs run; the driver alone writes the store.
"""

from __future__ import annotations

import contextlib
import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import pandas as pd

from harness.errors import ConfigError, HarnessError
from harness.experiment import Experiment, ModelJob, TaskJob, plan_jobs
from harness.progress import progress_bar
from harness.results import JobResult
from harness.store import ResultStore

ResultSink = Callable[[JobResult], None]


@dataclass
class RunSummary:
    experiment: str
    total: int
    reused: int
    computed: int
    failed: list[tuple[str, str, str]] = field(default_factory=list)  # (label, task, error)
    seconds: float = 0.0
    labels: list[str] = field(default_factory=list)  # models in run order


def reset_peak_rss() -> None:
    """Start a new peak-memory window (Linux: writing 5 to clear_refs resets VmHWM)."""
    with contextlib.suppress(OSError):  # elsewhere the peak stays the process's lifetime peak
        Path("/proc/self/clear_refs").write_text("5")


def peak_rss_mb() -> float:
    """Peak resident memory since the last `reset_peak_rss` (else since the process started)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def load_job_model(job: ModelJob):
    """(model, tokenizer, merge outcome or None): merges in memory, others from their directory."""
    from harness.engine import merge_state_dict
    from harness.models import build_model, load_pretrained, load_tokenizer, resolve_model

    if job.merge is not None:
        outcome = merge_state_dict(job.merge)
        model = build_model(outcome.model_config, outcome.state)
        outcome.state = None  # the model owns the tensors now
        return model, load_tokenizer(outcome.tokenizer_dir), outcome
    path = resolve_model(job.model_ref)
    return load_pretrained(path), load_tokenizer(path), None


def run_model_job(job: ModelJob, pending: Sequence[TaskJob], experiment: str, sink: ResultSink) -> None:
    """Build one model and evaluate it on its pending tasks, handing each result to `sink`."""
    from harness.evaluation import evaluate

    reset_peak_rss()  # the recorded peak is this job's: building the model and evaluating it
    start = time.perf_counter()
    model, tokenizer, outcome = load_job_model(job)
    build_seconds = time.perf_counter() - start
    coefficients = outcome.coefficients if outcome else []
    for task in pending:
        report = evaluate(model, tokenizer, [task.task], task.settings)
        timings = {"build": build_seconds, "evaluate": report.seconds}
        if outcome is not None:
            timings["merge"] = outcome.seconds
        sink(
            JobResult(
                key=task.key,
                experiment=experiment,
                model_label=job.label,
                spec=task.spec,
                scores=list(report.scores),
                coefficients=list(coefficients),
                timings=timings,
                versions=dict(report.versions),
                peak_rss_mb=peak_rss_mb(),
                samples_log=report.samples,
            )
        )


class Executor(Protocol):
    """Runs model jobs somewhere and hands their results back to the driver."""

    name: str

    def run(
        self,
        work: list[tuple[ModelJob, list[TaskJob]]],
        experiment: str,
        sink: ResultSink,
        on_start: Callable[[ModelJob, list[TaskJob]], None],
        on_error: Callable[[ModelJob, list[TaskJob], Exception], None],
    ) -> None: ...


class LocalExecutor:
    """In this process, one model at a time (the default)."""

    name = "local"

    def run(self, work, experiment, sink, on_start, on_error) -> None:
        for job, pending in work:
            on_start(job, pending)
            try:
                run_model_job(job, pending, experiment, sink)
            except HarnessError as exc:
                on_error(job, pending, exc)


EXECUTOR_NAMES = ("local", "ray")


def make_executor(name: str, address: str | None = None) -> Executor:
    """`local` (default) or `ray` (an existing cluster at `address`, or a local Ray instance)."""
    if name == "local":
        return LocalExecutor()
    if name == "ray":
        from harness.ray_executor import RayExecutor

        return RayExecutor(address=address)
    raise ConfigError(f"--executor: unknown executor {name!r} (known: {', '.join(EXECUTOR_NAMES)})")


def pending_work(jobs: list[ModelJob], store: ResultStore, experiment: str):
    """Split jobs into finished (reused: listed under this experiment) and to-do per model."""
    work, reused = [], 0
    for job in jobs:
        pending = []
        for task in job.tasks:
            if store.has_result(task.key):
                store.attach(task.key, experiment)
                reused += 1
            else:
                store.mark_pending(task.key, experiment, task.spec, label=job.label)
                pending.append(task)
        if pending:
            work.append((job, pending))
    return work, reused


def run_experiment(
    experiment: Experiment,
    store: ResultStore,
    executor: Executor | None = None,
    show_progress: bool = True,
) -> RunSummary:
    start = time.perf_counter()
    executor = executor or LocalExecutor()
    store.ensure_experiment(experiment.name, experiment.model_dump(mode="json"))
    jobs = plan_jobs(experiment, store)
    work, reused = pending_work(jobs, store, experiment.name)
    total = sum(len(job.tasks) for job in jobs)
    summary = RunSummary(experiment.name, total, reused, 0, labels=[job.label for job in jobs])
    with progress_bar(total - reused, f"{experiment.name}: evaluating", show_progress) as advance:

        def record(result: JobResult) -> None:
            store.record(result)
            summary.computed += 1
            advance()

        def fail(job: ModelJob, pending: list[TaskJob], exc: Exception) -> None:
            for task in pending:
                if not store.has_result(task.key):
                    store.mark_failed(task.key, str(exc))
                    summary.failed.append((job.label, task.task, str(exc)))
                    advance()

        def started(job: ModelJob, pending: list[TaskJob]) -> None:
            for task in pending:
                store.mark_started(task.key, experiment.name, task.spec, label=job.label)

        executor.run(work, experiment.name, record, started, fail)
    summary.seconds = time.perf_counter() - start
    return summary


def summary_frame(store: ResultStore, experiment: str, order: Sequence[str] = ()) -> pd.DataFrame:
    """Rows = models (in `order` first), columns = task + metric, values = scores: the end-of-run table."""
    frame = store.results_frame(experiment)
    if frame.empty:
        return frame
    frame = frame.assign(column=frame["task"] + " " + frame["metric"])
    table = frame.pivot_table(index="label", columns="column", values="value", aggfunc="first")
    labels = [label for label in order if label in table.index]
    return table.reindex(labels + sorted(set(table.index) - set(labels)))
