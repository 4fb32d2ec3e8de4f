"""The one failure policy and the executor contract.

Every executor goes through `Driver`: it claims a model job's tasks, records each result in the
store (from the driver's thread only) and, in `holding`, turns an exception raised by a job into
that job's failure while the run goes on (KeyboardInterrupt and SystemExit are not caught).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

from merge_harness.core.errors import HarnessError
from merge_harness.core.progress import Bar
from merge_harness.core.results import JobResult
from merge_harness.run.experiment import ModelJob, TaskJob
from merge_harness.run.worker import ModelCache, run_model_job
from merge_harness.store.claims import Claims
from merge_harness.store.database import ResultStore, utc_now

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

    def __init__(self, store: ResultStore, claims: Claims, summary: RunSummary, advance: Bar) -> None:
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
        if mine:
            self.advance.describe(f"{job.label} ({', '.join(task.task for task in mine)})")
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

    def __init__(self, reuse_models: bool = True) -> None:
        self.reuse_models = reuse_models  # merge every job into one model object (ModelCache)

    def run(self, work: list[Unit], experiment: str, driver: Driver) -> None:
        models = ModelCache() if self.reuse_models else None
        try:
            for job, pending in work:
                if tasks := driver.claim(job, pending):  # claimed just before building the model
                    with driver.holding(job, tasks):
                        run_model_job(job, tasks, experiment, driver.record, models)
        finally:
            if models is not None:
                models.close()
