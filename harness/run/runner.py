"""Run an experiment: skip finished jobs, build each model once, evaluate, record job by job.

A model (pre-trained, fine-tune, or merge) is built only if one of its tasks is unfinished; merges
happen in memory. Each task's result is committed to the store as soon as it exists, so a run
killed at any point restarts where it stopped and never recomputes or overwrites a finished job.
The executor decides where model jobs run; the driver alone writes the store.

Several runners may share one store: a runner claims a model's unfinished tasks (`merge_harness.store.claims`)
just before building it and skips the tasks another live runner holds; after its pass it tries the
skipped ones again, so a dead runner's jobs are taken over (`Claims.take` says when). Every
executor goes through `Driver`, which holds the one failure policy: an exception raised by a job
is that job's failure and the run goes on (KeyboardInterrupt and SystemExit are not caught).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from merge_harness.core.errors import CheckpointError, ConfigError
from merge_harness.core.progress import console as progress_console
from merge_harness.core.progress import progress_bar
from merge_harness.core.third_party import log_file_beside, third_party_output_to
from merge_harness.io.models import resolve_model
from merge_harness.reports import metrics
from merge_harness.run.driver import Driver, Executor, LocalExecutor, RunSummary, Unit
from merge_harness.run.experiment import Experiment, ModelJob, TaskJob, plan_jobs
from merge_harness.run.job_identity import file_sha256
from merge_harness.store.claims import DEFAULT_LEASE_S, Claims, heartbeat
from merge_harness.store.database import ResultStore

logger = logging.getLogger(__name__)


EXECUTOR_NAMES = ("local", "ray")


def make_executor(name: str, address: str | None = None) -> Executor:
    """`local` (default) or `ray` (an existing cluster at `address`, or a local Ray instance)."""
    if name == "local":
        return LocalExecutor()
    if name == "ray":
        from merge_harness.run.ray_executor import RayExecutor

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
    lease_s: float = DEFAULT_LEASE_S,
    quiet_third_party: bool = True,
) -> RunSummary:
    store.ensure_experiment(experiment.name, experiment.model_dump(mode="json"))
    jobs = plan_jobs(experiment, store)
    return run_jobs(experiment.name, jobs, store, executor, show_progress, lease_s, quiet_third_party)


def run_jobs(
    experiment: str,
    jobs: list[ModelJob],
    store: ResultStore,
    executor: Executor | None = None,
    show_progress: bool = True,
    lease_s: float = DEFAULT_LEASE_S,
    quiet_third_party: bool = True,
) -> RunSummary:
    """Reuse finished jobs, check the input weights, run the rest on `executor`, record each result.

    The one job path of `run`, `eval` and the demo. A model with NaN/inf weights fails before any
    evaluation: its jobs (and those of merges built from it) are marked failed, and the
    `CheckpointError` naming file and tensor is raised. Claims last `lease_s` seconds and are
    renewed every lease/4 while the run lasts. With `quiet_third_party`, what lm-eval and the
    other libraries print goes to the log file next to the store (`core/third_party.py`).
    """
    start = time.perf_counter()
    executor = executor or LocalExecutor()
    work, reused = pending_work(jobs, store, experiment)
    total = sum(len(job.tasks) for job in jobs)
    summary = RunSummary(experiment, total, reused, 0, labels=[job.label for job in jobs])
    check_input_weights(work, store)
    claims = Claims(store, lease_s=lease_s)
    log_file = log_file_beside(store.path) if quiet_third_party else None
    with (third_party_output_to(log_file, keep=[progress_console]),
          progress_bar(total - reused, f"{experiment}: evaluating", show_progress) as advance):
        driver = Driver(store, claims, summary, advance)
        try:
            with heartbeat(claims):
                skipped = share_work(executor, work, experiment, driver)
        finally:
            claims.release()  # e.g. on Ctrl-C: the others need not wait for the lease
        keys = [task.key for _, tasks in skipped for task in tasks]
        summary.elsewhere = len(keys)
        summary.elsewhere_unfinished = sum(not store.has_result(key) for key in keys)
        for _ in keys:
            advance()
    summary.seconds = time.perf_counter() - start
    return summary


def share_work(executor: Executor, work: list[Unit], experiment: str, driver: Driver) -> list[Unit]:
    """Run `work`, then again the tasks other runners held, as long as a pass claims any of
    them (a dead runner's claims lapse after their lease). Returns what others held at the end."""
    while work:
        driver.skipped, driver.took = [], 0
        executor.run(work, experiment, driver)
        if not driver.took:
            break
        work = driver.skipped
    return driver.skipped


# ----------------------------------------------------------------------------- broken weights


def input_models(job: ModelJob) -> list[str]:
    """The model references a job reads weights from: itself, or a merge's base and inputs."""
    if job.merge is None:
        return [job.model_ref] if job.model_ref else []
    return [job.merge.base_model, *(entry.model for entry in job.merge.models)]


def check_input_weights(work: list[tuple[ModelJob, list[TaskJob]]], store: ResultStore) -> None:
    """Every pending job's input weights are NaN/inf-free, or the jobs reading a broken model are
    marked failed and its error is raised: a broken model gives no result, not a baseline score."""
    errors: dict[str, CheckpointError | None] = {}
    for ref in dict.fromkeys(ref for job, _ in work for ref in input_models(job)):
        try:
            check_finite_weights(resolve_model(ref), store)
            errors[ref] = None
        except CheckpointError as exc:
            errors[ref] = exc
    broken = [exc for exc in errors.values() if exc is not None]
    if not broken:
        return
    for job, pending in work:
        error = next((errors[ref] for ref in input_models(job) if errors[ref]), None)
        for task in pending if error else ():
            store.mark_failed(task.key, str(error))
    raise broken[0]


def check_finite_weights(path: Path, store: ResultStore | None) -> None:
    """Read every tensor of a model directory once and refuse NaN or inf, naming file and tensor.

    A file that passed is remembered in the store by its content hash, so each file costs one
    pass ever; the check is the engine's own input check (`all_finite`, same message).
    """
    from merge_harness.io.checkpoint import Checkpoint
    from merge_harness.merge.engine import all_finite

    checkpoint = Checkpoint.open(path)
    by_file: dict[Path, list[str]] = {}
    for name, info in checkpoint.tensors.items():
        by_file.setdefault(info.file, []).append(name)
    try:
        for file, names in by_file.items():
            digest = file_sha256(file, store)
            if store is not None and store.weights_known_finite(digest):
                continue
            for name in names:
                if not all_finite(checkpoint.read(name)):
                    raise CheckpointError(f"{file}: tensor {name!r} contains NaN or inf")
            if store is not None:
                store.save_weights_finite(digest)
    finally:
        checkpoint.close()


def summary_frame(store: ResultStore, experiment: str, order: Sequence[str] = ()) -> pd.DataFrame:
    """The end-of-run table: rows = models (in `order` first), columns = tasks by their full
    names, values = each task's primary metric in points, the metric and scale reports use."""
    frame = store.results_frame(experiment)
    if frame.empty:
        return frame
    parts = []
    for task, rows in frame.groupby("task"):
        metric = metrics.primary_metric(str(task), rows["metric"].unique())
        chosen = rows[rows["metric"] == metric]
        parts.append(chosen.assign(value=chosen["value"] * metrics.points_per_unit(metric)))
    table = pd.concat(parts).pivot_table(index="label", columns="task", values="value", aggfunc="first")
    table.columns.name = None
    labels = [label for label in order if label in table.index]
    return table.reindex(labels + sorted(set(table.index) - set(labels)))
