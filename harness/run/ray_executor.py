"""Run model jobs on a Ray cluster (optional extra `ray`): one job per task, GPUs as resources.

Workers build the model, evaluate it and *return* their results; the driver alone writes the
SQLite store (SQLite must not be written from many hosts). The driver claims each job's tasks
before dispatching it (the claims of `merge_harness.store.claims`, renewed by the driver's heartbeat), so a
local runner or another driver on the same store never computes them too. A worker that dies
(OOM, preemption, a killed process) is retried `max_retries` times by Ray; an error raised by the
job itself is not retried and is recorded as that job's failure, as with the local executor.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from merge_harness.core.errors import ConfigError, HarnessError
from merge_harness.core.results import JobResult
from merge_harness.run.experiment import ModelJob, TaskJob

if TYPE_CHECKING:
    from merge_harness.run.driver import Driver, Unit


def run_remotely(job: ModelJob, pending: list[TaskJob], experiment: str) -> list[JobResult]:
    """The function a Ray worker runs: one model job, its results returned to the driver."""
    from merge_harness.run.worker import run_model_job

    results: list[JobResult] = []
    run_model_job(job, pending, experiment, results.append)
    return results


class RayExecutor:
    name = "ray"
    job_function = staticmethod(run_remotely)  # what each Ray task runs

    def __init__(
        self,
        address: str | None = None,
        num_gpus: float | None = None,
        num_cpus: float = 1,
        max_retries: int = 1,
        init_kwargs: dict[str, Any] | None = None,
    ):
        try:
            import ray  # noqa: F401
        except ImportError as exc:
            raise ConfigError(
                "--executor ray needs the `ray` extra: pip install 'merge-harness[ray]'"
            ) from exc
        self.address = address
        self.num_gpus = num_gpus
        self.num_cpus = num_cpus
        self.max_retries = max_retries
        self.init_kwargs = init_kwargs or {}

    def _gpus_per_job(self, work: list[Unit]) -> float:
        """One GPU per job when jobs run on CUDA, none for CPU jobs, unless set explicitly."""
        if self.num_gpus is not None:
            return self.num_gpus
        devices = {job.merge.device if job.merge else pending[0].settings.device for job, pending in work}
        return 1.0 if any(str(d).startswith("cuda") for d in devices) else 0.0

    def run(self, work: list[Unit], experiment: str, driver: Driver) -> None:
        import ray

        if not ray.is_initialized():
            ray.init(address=self.address, include_dashboard=False, log_to_driver=False, **self.init_kwargs)
        remote = ray.remote(
            num_cpus=self.num_cpus,
            num_gpus=self._gpus_per_job(work),
            max_retries=self.max_retries,
            retry_exceptions=False,
        )(self.job_function)
        running = {}
        for job, pending in work:
            if tasks := driver.claim(job, pending):  # claimed before it is dispatched
                running[remote.remote(job, tasks, experiment)] = (job, tasks)
        while running:
            (ready,), _ = ray.wait(list(running), num_returns=1)
            job, tasks = running.pop(ready)
            with driver.holding(job, tasks):
                for result in job_results(ready):
                    driver.record(result)


def job_results(ref) -> list[JobResult]:
    """A finished Ray task's results, or the job's own exception (a dead worker: a HarnessError)."""
    import ray

    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, Exception):
            raise exc.cause from None
        raise  # a cause that did not survive pickling: the RayTaskError is the failure
    except ray.exceptions.RayError as exc:  # the worker died more often than retried
        raise HarnessError(f"ray worker failed: {type(exc).__name__}: {exc}") from exc
