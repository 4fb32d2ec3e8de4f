"""Run model jobs on a Ray cluster (optional extra `ray`): one job per task, GPUs as resources.

Workers build the model, evaluate it and *return* their results; the driver alone writes the
SQLite store (SQLite must not be written from many hosts). A worker that dies (OOM, preemption,
a killed process) is retried `max_retries` times by Ray; an error raised by the job itself (bad
config, failed evaluation) is not retried and is recorded as that job's failure.
"""

from __future__ import annotations

from typing import Any

from harness.errors import ConfigError, HarnessError
from harness.experiment import ModelJob, TaskJob
from harness.results import JobResult


def run_remotely(job: ModelJob, pending: list[TaskJob], experiment: str) -> list[JobResult]:
    """The function a Ray worker runs: one model job, its results returned to the driver."""
    from harness.runner import run_model_job

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

    def _gpus_per_job(self, work: list[tuple[ModelJob, list[TaskJob]]]) -> float:
        """One GPU per job when jobs run on CUDA, none for CPU jobs, unless set explicitly."""
        if self.num_gpus is not None:
            return self.num_gpus
        devices = {job.merge.device if job.merge else pending[0].settings.device for job, pending in work}
        return 1.0 if any(str(d).startswith("cuda") for d in devices) else 0.0

    def run(self, work, experiment, sink, on_start, on_error) -> None:
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
            on_start(job, pending)
            running[remote.remote(job, pending, experiment)] = (job, pending)
        while running:
            (ready,), _ = ray.wait(list(running), num_returns=1)
            job, pending = running.pop(ready)
            try:
                results = ray.get(ready)
            except ray.exceptions.RayTaskError as exc:
                cause = exc.cause if isinstance(exc.cause, HarnessError) else exc
                on_error(job, pending, cause)
                continue
            except ray.exceptions.RayError as exc:  # worker died more often than retried
                on_error(job, pending, HarnessError(f"ray worker failed: {type(exc).__name__}: {exc}"))
                continue
            for result in results:
                sink(result)
