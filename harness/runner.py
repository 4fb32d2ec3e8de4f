"""Run an experiment: skip finished jobs, build each model once, evaluate, record job by job.

A model (pre-trained, fine-tune, or merge) is built only if one of its tasks is unfinished; merges
happen in memory. Each task's result is committed to the store as soon as it exists, so a run
killed at any point restarts where it stopped and never recomputes or overwrites a finished job.
The executor decides where model jobs run; the driver alone writes the store.

Several runners may share one store: a runner claims a model's unfinished tasks (`harness.claims`)
just before building it and skips the tasks another live runner holds; after its pass it tries the
skipped ones again, so a dead runner's jobs are taken over (`Claims.take` says when). Every
executor goes through `Driver`, which holds the one failure policy: an exception raised by a job
is that job's failure and the run goes on (KeyboardInterrupt and SystemExit are not caught).
"""

from __future__ import annotations

import contextlib
import logging
import resource
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import pandas as pd

from harness.claims import DEFAULT_LEASE_S, Claims, heartbeat
from harness.config import MergeConfig
from harness.errors import CheckpointError, ConfigError, HarnessError
from harness.experiment import Experiment, ModelJob, TaskJob, plan_jobs
from harness.job_identity import file_sha256
from harness.models import resolve_model
from harness.progress import progress_bar
from harness.results import JobResult
from harness.store import ResultStore, utc_now

ResultSink = Callable[[JobResult], None]
Unit = tuple[ModelJob, list[TaskJob]]  # a model job and the tasks to evaluate it on
logger = logging.getLogger(__name__)


@dataclass
class RunSummary:
    experiment: str
    total: int
    reused: int
    computed: int
    failed: list[tuple[str, str, str]] = field(default_factory=list)  # (label, task, error)
    elsewhere: int = 0  # jobs another runner held, so this one did not compute them
    elsewhere_unfinished: int = 0  # of those, not done when this run ended: a rerun picks them up
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


def searched_merge(job: ModelJob) -> tuple[MergeConfig | None, dict | None]:
    """The merge to build and, for a `search:` job, what the held-out search chose (else None)."""
    if job.merge is None or job.search is None:
        return job.merge, None
    from harness.diagnostics.data import DataSettings
    from harness.diagnostics.search import SearchSpec, search_coefficient

    search, merge = job.search, job.merge
    settings = search.settings
    finetunes = {entry.model: entry.model for entry in merge.models if entry.model in search.held_out}
    spec = SearchSpec(
        method=merge.method,
        parameter=settings.parameter,
        grid=settings.grid,
        metric=settings.metric,
        calibration={m: s for m, s in search.calibration.items() if m in finetunes},
    )

    def at(value: float) -> MergeConfig:  # the job's own merge, the searched parameter replaced
        return merge.model_copy(update={"parameters": {**merge.parameters, settings.parameter: value}})

    data = DataSettings(
        num_samples=settings.num_samples,
        seed=settings.seed,
        template=search.template,
        max_length=settings.max_length,
        batch_size=settings.batch_size,
        held_out_fraction=None if search.whole_sources else settings.held_out_fraction,
    )
    result = search_coefficient(merge.base_model, finetunes, search.held_out, spec, data, config_at=at)
    selected = {"by": "held-out", "parameter": settings.parameter, "value": result.chosen,
                "metric": settings.metric, "score": result.best_score}
    return at(result.chosen), selected


def load_job_model(job: ModelJob, merge: MergeConfig | None = None):
    """(model, tokenizer, merge outcome or None): merges in memory, others from their directory."""
    from harness.engine import merge_state_dict
    from harness.models import build_model, load_pretrained, load_tokenizer, resolve_model

    merge = merge or job.merge
    if merge is not None:
        outcome = merge_state_dict(merge)
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
    merge, selected = searched_merge(job)
    model, tokenizer, outcome = load_job_model(job, merge)
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
                spec={**task.spec, "selected": selected} if selected else task.spec,
                scores=list(report.scores),
                coefficients=list(coefficients),
                timings=timings,
                versions=dict(report.versions),
                peak_rss_mb=peak_rss_mb(),
                samples_log=report.samples,
            )
        )


def failure_message(exc: Exception) -> str:
    """The one line recorded for a failed job: a HarnessError's message, else type and first line."""
    if isinstance(exc, HarnessError):
        return " ".join(str(exc).split())
    first = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


class Driver:
    """What every executor calls for a model job: `claim` it, `record` results, inside `holding`.

    Writes the store from the driver's thread only; counts into the run's summary.
    """

    def __init__(self, store: ResultStore, claims: Claims, summary: RunSummary,
                 advance: Callable[[], None]) -> None:
        self.store, self.claims, self.summary, self.advance = store, claims, summary, advance
        self.started_at = utc_now()
        self.skipped: list[Unit] = []  # tasks another runner held when this one came to them
        self.took = 0  # tasks claimed in the current pass

    def claim(self, job: ModelJob, pending: list[TaskJob]) -> list[TaskJob]:
        """Claim the job's tasks that are still unfinished and free; mark them started."""
        held = set(self.claims.take([t.key for t in pending], failed_since=self.started_at))
        mine = [task for task in pending if task.key in held]
        if others := [task for task in pending if task.key not in held]:
            self.skipped.append((job, others))
        for task in mine:
            self.store.mark_started(task.key, self.summary.experiment, task.spec, label=job.label)
        self.took += len(mine)
        return mine

    def record(self, result: JobResult) -> None:
        self.store.record(result)
        self.summary.computed += 1
        self.advance()

    @contextlib.contextmanager
    def holding(self, job: ModelJob, tasks: list[TaskJob]) -> Iterator[None]:
        """Around one claimed job: an exception in the body fails its unfinished tasks (the
        run goes on); the claims are released however the body ends."""
        try:
            yield
        except Exception as exc:  # noqa: BLE001 - the failure policy: any error fails this job only
            logger.debug("job %s failed", job.label, exc_info=exc)
            self.fail(job, tasks, failure_message(exc))
        finally:
            self.claims.release([task.key for task in tasks])

    def fail(self, job: ModelJob, tasks: list[TaskJob], message: str) -> None:
        for task in tasks:
            if not self.store.has_result(task.key):
                self.store.mark_failed(task.key, message)
                self.summary.failed.append((job.label, task.task, message))
                self.advance()


class Executor(Protocol):
    """Runs claimed model jobs somewhere; the results come back to the driver.

    For each unit of `work`: `tasks = driver.claim(job, pending)`, skip it if empty, and hand
    the results to `driver.record` inside `with driver.holding(job, tasks):`.
    """

    name: str

    def run(self, work: list[Unit], experiment: str, driver: Driver) -> None: ...


class LocalExecutor:
    """In this process, one model at a time (the default)."""

    name = "local"

    def run(self, work: list[Unit], experiment: str, driver: Driver) -> None:
        for job, pending in work:
            if tasks := driver.claim(job, pending):  # claimed just before building the model
                with driver.holding(job, tasks):
                    run_model_job(job, tasks, experiment, driver.record)


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
    lease_s: float = DEFAULT_LEASE_S,
) -> RunSummary:
    store.ensure_experiment(experiment.name, experiment.model_dump(mode="json"))
    jobs = plan_jobs(experiment, store)
    return run_jobs(experiment.name, jobs, store, executor, show_progress, lease_s)


def run_jobs(
    experiment: str,
    jobs: list[ModelJob],
    store: ResultStore,
    executor: Executor | None = None,
    show_progress: bool = True,
    lease_s: float = DEFAULT_LEASE_S,
) -> RunSummary:
    """Reuse finished jobs, check the input weights, run the rest on `executor`, record each result.

    The one job path of `run`, `eval` and the demo. A model with NaN/inf weights fails before any
    evaluation: its jobs (and those of merges built from it) are marked failed, and the
    `CheckpointError` naming file and tensor is raised. Claims last `lease_s` seconds and are
    renewed every lease/4 while the run lasts.
    """
    start = time.perf_counter()
    executor = executor or LocalExecutor()
    work, reused = pending_work(jobs, store, experiment)
    total = sum(len(job.tasks) for job in jobs)
    summary = RunSummary(experiment, total, reused, 0, labels=[job.label for job in jobs])
    check_input_weights(work, store)
    claims = Claims(store, lease_s=lease_s)
    with progress_bar(total - reused, f"{experiment}: evaluating", show_progress) as advance:
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
    from harness.checkpoint import Checkpoint
    from harness.engine import all_finite

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
    """Rows = models (in `order` first), columns = task + metric, values = scores: the end-of-run table."""
    frame = store.results_frame(experiment)
    if frame.empty:
        return frame
    frame = frame.assign(column=frame["task"] + " " + frame["metric"])
    table = frame.pivot_table(index="label", columns="column", values="value", aggfunc="first")
    labels = [label for label in order if label in table.index]
    return table.reindex(labels + sorted(set(table.index) - set(labels)))
