"""The Ray executor on a local Ray instance: same results as local, retries, one record per job,
the local executor's failure policy, and the same job claims (the driver claims before dispatch)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from merge_harness.run.driver import LocalExecutor
from merge_harness.run.experiment import load_experiment, plan_jobs
from merge_harness.run.runner import run_experiment
from merge_harness.store.claims import Claims
from merge_harness.store.database import ResultStore
from tests.conftest import write_experiment

ray = pytest.importorskip("ray", reason="the `ray` extra is not installed")

from merge_harness.run.ray_executor import RayExecutor, run_remotely  # noqa: E402

CRASH_MARKER = "MERGE_HARNESS_TEST_CRASH_MARKER"


def crash_first_attempt(job, pending, experiment):
    """Kill the worker process the first time any job runs (as an OOM kill would)."""
    marker = Path(os.environ[CRASH_MARKER])
    if not marker.exists():
        marker.write_text(str(os.getpid()))
        os._exit(1)
    return run_remotely(job, pending, experiment)


class CrashingRayExecutor(RayExecutor):
    job_function = staticmethod(crash_first_attempt)


def fail_unexpectedly(job, pending, experiment):
    raise ValueError(f"no luck with {job.label}\nmore detail")


class FailingRayExecutor(RayExecutor):
    job_function = staticmethod(fail_unexpectedly)


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory):
    marker = tmp_path_factory.mktemp("ray") / "crashed"
    ray.cloudpickle.register_pickle_by_value(__import__(__name__))
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {CRASH_MARKER: str(marker)}})
    yield marker
    ray.shutdown()


def scores(store: ResultStore, experiment: str) -> dict[tuple, float]:
    frame = store.results_frame(experiment)
    return {(r.label, r.task, r.metric): r.value for r in frame.itertuples()}


def test_ray_gives_local_results_retries_a_killed_worker_and_records_once(local_ray, chat_zoo, tmp_path):
    methods = "  - method: task_arithmetic\n    parameters: {lambda: 0.7}\n  - method: ties\n"
    path = write_experiment(tmp_path / "e.yaml", chat_zoo, tmp_path / "unused.sqlite", methods)
    experiment = load_experiment(path).model_copy(update={"baselines": False})
    with ResultStore(tmp_path / "local.sqlite") as local_store:
        run_experiment(experiment, local_store, LocalExecutor(), show_progress=False)
        expected = scores(local_store, experiment.name)
    with ResultStore(tmp_path / "ray.sqlite") as ray_store:
        summary = run_experiment(experiment, ray_store, CrashingRayExecutor(), show_progress=False)
        assert local_ray.exists(), "no worker was killed, so the retry was not exercised"
        assert summary.failed == [] and summary.computed == 4
        assert scores(ray_store, experiment.name) == expected
        jobs = ray_store.jobs(experiment.name)
        assert len(jobs) == 4 and {job["status"] for job in jobs} == {"done"}
        again = run_experiment(experiment, ray_store, CrashingRayExecutor(), show_progress=False)
        assert (again.computed, again.reused) == (0, 4)


def test_ray_records_any_job_error_in_one_line_and_skips_held_jobs(local_ray, chat_zoo, tmp_path):
    methods = "  - method: task_arithmetic\n    parameters: {lambda: 0.7}\n  - method: ties\n"
    path = write_experiment(tmp_path / "e.yaml", chat_zoo, tmp_path / "s.sqlite", methods)
    experiment = load_experiment(path).model_copy(update={"baselines": False})
    with ResultStore(tmp_path / "s.sqlite") as store:
        ties = next(job for job in plan_jobs(experiment, store) if job.label == "ties")
        Claims(store, "another-runner", lease_s=600).take([task.key for task in ties.tasks])
        summary = run_experiment(experiment, store, FailingRayExecutor(), show_progress=False)
        assert (summary.computed, summary.elsewhere, summary.elsewhere_unfinished) == (0, 2, 2)
        assert {(label, error) for label, _, error in summary.failed} == {
            ("task_arithmetic", "ValueError: no luck with task_arithmetic")}
        statuses = {job["label"]: job["status"] for job in store.jobs(experiment.name)}
        assert statuses == {"task_arithmetic": "failed", "ties": "pending"}  # ties never dispatched
