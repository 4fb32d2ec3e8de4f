"""The experiment runner: job expansion, content keys, end to end with real lm-eval, resume after kill."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from merge_harness.core.errors import ConfigError, EvaluationError
from merge_harness.run.experiment import load_experiment, method_configs, plan_jobs
from merge_harness.run.runner import run_experiment, summary_frame
from merge_harness.store.claims import Claims
from merge_harness.store.database import ResultStore
from tests.conftest import write_experiment


def test_grid_expands_to_labelled_merges(chat_zoo, tmp_path):
    experiment = load_experiment(write_experiment(tmp_path / "e.yaml", chat_zoo, tmp_path / "s.sqlite"))
    labels = [label for label, _ in method_configs(experiment)]
    assert labels == ["task_arithmetic (lambda=0.5)", "task_arithmetic (lambda=1.0)", "ties"]
    jobs = plan_jobs(experiment)
    assert [j.kind for j in jobs] == ["base", "finetune", "finetune", "merge", "merge", "merge"]
    keys = [t.key for j in jobs for t in j.tasks]
    assert len(keys) == len(set(keys)) == 12


# What changes a job key and what does not: tests/test_job_keys.py.


def test_duplicate_job_specs_are_refused(chat_zoo, tmp_path):
    methods = "  - method: ties\n  - method: ties\n"
    experiment = load_experiment(write_experiment(tmp_path / "e.yaml", chat_zoo, tmp_path / "s", methods))
    with pytest.raises(ConfigError, match=r"methods\[1\]: duplicate job spec 'ties'"):
        method_configs(experiment)


def test_malformed_experiment_names_field_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(
        "name: x\nbase_model: b\nfinetunes:\n  m: {model: a}\ntasks: [gsm8k]\nevaluation:\n  limt: 3\n"
    )
    with pytest.raises(ConfigError, match=r"bad\.yaml:7: evaluation\.limt: Extra inputs are not permitted"):
        load_experiment(path)


def test_unknown_task_suggests_names(chat_zoo, tmp_path):
    path = write_experiment(tmp_path / "e.yaml", chat_zoo, tmp_path / "s.sqlite")
    path.write_text(path.read_text().replace("cosmos_qa_fixture]", "cosmos_qa_fixtur]"))
    with pytest.raises(EvaluationError, match="cosmos_qa_fixture"):
        plan_jobs(load_experiment(path))


def test_run_records_every_job_and_a_rerun_computes_nothing(chat_zoo, tmp_path):
    store_path = tmp_path / "results.sqlite"
    experiment = load_experiment(write_experiment(tmp_path / "e.yaml", chat_zoo, store_path))
    with ResultStore(store_path) as store:
        first = run_experiment(experiment, store, show_progress=False)
        assert (first.total, first.computed, first.reused, first.failed) == (12, 12, 0, [])
        table = summary_frame(store, experiment.name, first.labels)
        assert list(table.index) == [
            "pre-trained",
            "math",
            "qa",
            "task_arithmetic (lambda=0.5)",
            "task_arithmetic (lambda=1.0)",
            "ties",
        ]
        tasks = [t.name for t in experiment.task_runs()]
        assert list(table.columns) == sorted(tasks)  # one column per task, by its full name
        acc = store.results_frame(experiment.name).query("task == 'cosmos_qa_fixture' and metric == 'acc'")
        assert table.loc["ties", "cosmos_qa_fixture"] == 100 * acc.set_index("label").at["ties", "value"]
        assert table.notna().all().all()
        second = run_experiment(experiment, store, show_progress=False)
        assert (second.computed, second.reused) == (0, 12)
        frame = store.results_frame(experiment.name)
        assert set(frame["label"]) >= {"ties", "pre-trained"}
        merge_rows = frame[frame["label"] == "ties"]
        assert (merge_rows["time_merge"] > 0).all()


def test_a_merge_failing_at_run_time_is_recorded_and_others_still_run(chat_zoo, tmp_path):
    # weights summing to 0 pass validation but cannot be normalised: the merge itself fails
    methods = (
        "  - method: ties\n"
        "  - method: linear\n"
        "    model_parameters: {math: {weight: 1.0}, qa: {weight: -1.0}}\n"
    )
    path = write_experiment(tmp_path / "e.yaml", chat_zoo, tmp_path / "s.sqlite", methods)
    experiment = load_experiment(path).model_copy(update={"baselines": False})
    with ResultStore(tmp_path / "s.sqlite") as store:
        summary = run_experiment(experiment, store, show_progress=False)
        assert summary.computed == 2 and len(summary.failed) == 2
        assert all(label == "linear" and "sum to 0" in error for label, _, error in summary.failed)
        statuses = {job["label"]: job["status"] for job in store.jobs(experiment.name)}
        assert statuses == {"ties": "done", "linear": "failed"}


def test_invalid_method_configs_are_refused_before_any_work(chat_zoo, tmp_path):
    methods = "  - method: slerp\n    parameters: {t: 0.5}\n"  # slerp takes exactly one non-base model
    path = write_experiment(tmp_path / "e.yaml", chat_zoo, tmp_path / "s.sqlite", methods)
    with pytest.raises(ConfigError, match="slerp' takes 1 non-base models, got 2"):
        plan_jobs(load_experiment(path))


def finished_jobs(store_path: Path) -> dict[str, str]:
    try:
        with sqlite3.connect(store_path) as conn:
            return dict(conn.execute("SELECT key, finished_at FROM jobs WHERE status = 'done'").fetchall())
    except sqlite3.OperationalError:  # the runner has not created its tables yet
        return {}


def test_resume_after_sigkill_keeps_and_skips_finished_jobs(chat_zoo, tmp_path):
    store_path = tmp_path / "results.sqlite"
    path = write_experiment(tmp_path / "e.yaml", chat_zoo, store_path)
    command = [sys.executable, "-m", "merge_harness", "run", str(path), "--quiet"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        if store_path.exists() and len(finished_jobs(store_path)) >= 3:
            break
        time.sleep(0.2)
    assert process.poll() is None, f"runner ended before it could be killed: {process.stderr.read()}"
    process.send_signal(signal.SIGKILL)
    process.wait()
    before = finished_jobs(store_path)
    assert 3 <= len(before) < 12
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    after = finished_jobs(store_path)
    assert len(after) == 12
    assert all(after[key] == stamp for key, stamp in before.items())  # kept, not recomputed
    assert f"{len(before)} reused, {12 - len(before)} computed" in result.stdout


SIX_TASKS = [
    "gsm8k_fixture",
    "winogrande_fixture",
    "cosmos_qa_fixture",
    "ropes_fixture",
    "humaneval_sandboxed_fixture",
    "wmt22_zh_en_fixture",
]


def test_two_merges_on_all_six_fixture_tasks_land_in_sqlite(chat_zoo, tmp_path):
    methods = "  - method: task_arithmetic\n    parameters: {lambda: 0.5}\n  - method: ties\n"
    path = write_experiment(tmp_path / "e.yaml", chat_zoo, tmp_path / "s.sqlite", methods)
    experiment = load_experiment(path).model_copy(update={"baselines": False, "tasks": SIX_TASKS})
    with ResultStore(tmp_path / "s.sqlite") as store:
        summary = run_experiment(experiment, store, show_progress=False)
        assert (summary.computed, summary.failed) == (12, [])
    import sqlite3

    with sqlite3.connect(tmp_path / "s.sqlite") as conn:
        rows = conn.execute(
            "SELECT j.label, s.task, s.metric, s.value FROM scores s JOIN jobs j ON j.key = s.job_key"
        ).fetchall()
    assert {(label, task) for label, task, _, _ in rows} == {
        (label, task) for label in ("task_arithmetic", "ties") for task in SIX_TASKS
    }
    metrics = {(task, metric) for _, task, metric, _ in rows}
    for expected in [
        ("gsm8k_fixture", "exact_match,strict-match"),
        ("winogrande_fixture", "acc"),
        ("cosmos_qa_fixture", "acc"),
        ("ropes_fixture", "f1"),
        ("humaneval_sandboxed_fixture", "pass@1"),
        ("wmt22_zh_en_fixture", "bleu"),
    ]:
        assert expected in metrics
    assert all(value == value for *_, value in rows)  # no NaN


TWO_MERGES = "  - method: task_arithmetic\n    parameters: {lambda: 0.5}\n  - method: ties\n"


def two_merge_experiment(zoo, tmp_path):
    path = write_experiment(tmp_path / "e.yaml", zoo, tmp_path / "s.sqlite", TWO_MERGES)
    return load_experiment(path).model_copy(update={"baselines": False})


def test_jobs_another_live_runner_holds_are_counted_not_failed_and_a_rerun_takes_them(chat_zoo, tmp_path):
    experiment = two_merge_experiment(chat_zoo, tmp_path)
    with ResultStore(tmp_path / "s.sqlite") as store:
        ties = next(job for job in plan_jobs(experiment, store) if job.label == "ties")
        other = Claims(store, "another-runner", lease_s=600)
        assert len(other.take([task.key for task in ties.tasks])) == 2
        summary = run_experiment(experiment, store, show_progress=False)
        assert (summary.computed, summary.failed) == (2, [])
        assert (summary.elsewhere, summary.elsewhere_unfinished) == (2, 2)
        statuses = {job["label"]: job["status"] for job in store.jobs(experiment.name)}
        assert statuses == {"task_arithmetic": "done", "ties": "pending"}
        other.release()  # the other runner stops (or its lease runs out): a rerun picks them up
        rerun = run_experiment(experiment, store, show_progress=False)
        assert (rerun.reused, rerun.computed, rerun.elsewhere) == (2, 2, 0)


def test_any_exception_in_a_job_is_its_one_line_failure_and_the_run_goes_on(chat_zoo, tmp_path, monkeypatch):
    import merge_harness.run.driver as driver

    original = driver.run_model_job

    def broken_ties(job, pending, experiment, sink, models=None):
        if job.label == "ties":
            raise ValueError("unexpected\nsecond line of detail")
        original(job, pending, experiment, sink, models)

    monkeypatch.setattr(driver, "run_model_job", broken_ties)
    experiment = two_merge_experiment(chat_zoo, tmp_path)
    with ResultStore(tmp_path / "s.sqlite") as store:
        summary = run_experiment(experiment, store, show_progress=False)
        assert summary.computed == 2
        assert {(label, error) for label, _, error in summary.failed} == {("ties", "ValueError: unexpected")}
        statuses = {job["label"]: job["status"] for job in store.jobs(experiment.name)}
        assert statuses == {"task_arithmetic": "done", "ties": "failed"}


def test_keyboard_interrupt_is_not_swallowed_and_releases_the_claims(chat_zoo, tmp_path, monkeypatch):
    import merge_harness.run.driver as driver

    def interrupted(job, pending, experiment, sink, models=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(driver, "run_model_job", interrupted)
    experiment = two_merge_experiment(chat_zoo, tmp_path)
    with ResultStore(tmp_path / "s.sqlite") as store:
        with pytest.raises(KeyboardInterrupt):
            run_experiment(experiment, store, show_progress=False)
        assert {job["status"] for job in store.jobs(experiment.name)} == {"running", "pending"}
    with sqlite3.connect(tmp_path / "s.sqlite") as conn:
        assert conn.execute("SELECT COUNT(*) FROM claims").fetchone() == (0,)
