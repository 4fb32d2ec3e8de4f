"""The SQLite result store, on real files in tmp_path."""

from __future__ import annotations

import json
import math
import os
import sqlite3
import time

import pandas as pd
import pytest

from merge_harness.core.errors import StoreError
from merge_harness.core.results import Coefficient, JobResult, Score
from merge_harness.store.database import ResultStore, content_key
from merge_harness.store.migrations import MIGRATIONS, migrate
from merge_harness.store.results_file import ImportOutcome

TIES_SPEC = {"merge": {"method": "ties", "params": {"density": 0.5, "lambda": 1.0}},
             "models": ["base", "math", "code"], "tasks": ["gsm8k", "mbpp"]}
BASE_SPEC = {"model": "base", "tasks": ["gsm8k", "mbpp"]}


def make_result(spec=TIES_SPEC, *, experiment="exp", label="TIES", gsm8k=0.42, **extra):
    fields = {
        "scores": [Score("gsm8k", "exact_match", gsm8k, 0.01, 100),
                   Score("mbpp", "pass@1", 0.3, None, 50)],
        "coefficients": [Coefficient("layers.0.attn", "math", 0.7),
                         Coefficient("layers.0.mlp", "code", 0.2)],
        "timings": {"merge": 1.5, "eval": 10.25},
        "versions": {"lm_eval": "0.4.5", "torch": "2.5.0"},
        "peak_rss_mb": 512.0,
        "samples_log": [{"doc_id": 0, "correct": True}],
    }
    fields.update(extra)
    return JobResult(key=content_key(spec), experiment=experiment, model_label=label, spec=spec,
                     **fields)


@pytest.fixture
def store(tmp_path):
    with ResultStore(tmp_path / "results.sqlite") as s:
        yield s


def count_rows(path, key):
    with sqlite3.connect(path) as conn:
        return {t: conn.execute(f"SELECT COUNT(*) FROM {t} WHERE {col} = ?", (key,)).fetchone()[0]
                for t, col in [("jobs", "key"), ("scores", "job_key"), ("coefficients", "job_key"),
                               ("timings", "job_key"), ("versions", "job_key"),
                               ("samples", "job_key"), ("experiment_jobs", "job_key")]}


def test_content_key_is_stable_across_key_order_and_differs_for_other_specs():
    reordered = {"tasks": ["gsm8k", "mbpp"], "models": ["base", "math", "code"],
                 "merge": {"params": {"lambda": 1.0, "density": 0.5}, "method": "ties"}}
    assert content_key(TIES_SPEC) == content_key(reordered)
    assert len(content_key(TIES_SPEC)) == 64
    other = {**TIES_SPEC, "merge": {"method": "ties", "params": {"density": 0.6, "lambda": 1.0}}}
    assert content_key(other) != content_key(TIES_SPEC)
    assert content_key({"tasks": ["a", "b"]}) != content_key({"tasks": ["b", "a"]})
    with pytest.raises(StoreError, match="NaN"):
        content_key({"lambda": math.nan})
    with pytest.raises(StoreError, match="JSON"):
        content_key({"path": object()})


def test_record_then_get_round_trips_every_field(store):
    result = make_result()
    assert not store.has_result(result.key)
    store.record(result)
    assert store.has_result(result.key)
    assert store.get_result(result.key) == result
    assert store.get_result("0" * 64) is None
    [job] = store.jobs()
    assert (job["key"], job["status"], job["label"]) == (result.key, "done", "TIES")
    assert job["finished_at"] is not None and job["error"] is None


def test_identical_rerecord_is_a_noop_keeping_the_first_provenance(store):
    store.record(make_result())
    store.record(make_result(timings={"merge": 99.0}))  # same scores: same result
    assert store.get_result(make_result().key).timings == {"merge": 1.5, "eval": 10.25}
    assert count_rows(store.path, make_result().key)["scores"] == 2


def test_conflicting_rerecord_raises_naming_key_and_experiment(store):
    store.record(make_result())
    with pytest.raises(StoreError) as err:
        store.record(make_result(gsm8k=0.5, experiment="other"))
    message = str(err.value)
    assert make_result().key in message and "'exp'" in message and "scores" in message
    assert "\n" not in message
    assert store.get_result(make_result().key).scores[0].value == 0.42


def test_replace_overwrites_all_rows_of_the_job(store):
    store.record(make_result())
    new = make_result(scores=[Score("gsm8k", "exact_match", 0.5)], coefficients=[],
                      timings={"eval": 3.0}, samples_log=None)
    store.record(new, replace=True)
    assert store.get_result(new.key) == new
    assert count_rows(store.path, new.key)["coefficients"] == 0


def test_results_frame_has_one_row_per_job_task_metric(store):
    store.record(make_result())
    base = make_result(BASE_SPEC, label="pre-trained", coefficients=[], timings={})
    store.record(base)
    frame = store.results_frame()
    assert list(frame.columns[:11]) == ["key", "experiment", "label", "method", "task", "metric",
                                       "value", "stderr", "samples", "peak_rss_mb", "spec_json"]
    assert {"param_density", "param_lambda", "time_merge", "time_eval"} <= set(frame.columns)
    assert len(frame) == 4
    ties = frame[(frame.label == "TIES") & (frame.task == "gsm8k")].iloc[0]
    assert (ties.method, ties.metric, ties.value, ties.stderr, ties.samples) == (
        "ties", "exact_match", 0.42, 0.01, 100)
    assert (ties.param_density, ties.time_eval, ties.experiment) == (0.5, 10.25, "exp")
    pre = frame[frame.label == "pre-trained"]
    assert pre.method.isna().all() and pre.param_density.isna().all()
    assert math.isnan(frame[(frame.label == "TIES") & (frame.task == "mbpp")].stderr.iloc[0])
    assert store.results_frame("nothing-here").empty
    coefficients = store.coefficients_frame(make_result().key)
    assert coefficients[["submodule", "task", "value"]].values.tolist() == [
        ["layers.0.attn", "math", 0.7], ["layers.0.mlp", "code", 0.2]]


def test_a_job_serves_every_experiment_that_records_or_attaches_it(store):
    store.record(make_result(experiment="A"))
    store.record(make_result(experiment="B"))  # identical content: only the link is added
    base = make_result(BASE_SPEC, experiment="A", label="pre-trained")
    store.record(base)
    store.attach(base.key, "C")
    assert set(store.results_frame("B").label) == {"TIES"}
    assert set(store.results_frame("B").experiment) == {"B"}
    assert set(store.results_frame("C").label) == {"pre-trained"}
    assert len(store.results_frame()) == 4  # no duplicates across experiments
    assert [j["label"] for j in store.jobs("C")] == ["pre-trained"]
    with pytest.raises(StoreError, match="no job"):
        store.attach("f" * 64, "C")


def test_export_then_import_into_a_fresh_store_gives_identical_frames(store, tmp_path):
    store.record(make_result(experiment="A"))
    store.record(make_result(experiment="B"))
    store.record(make_result(BASE_SPEC, experiment="A", label="pre-trained", coefficients=[]))
    store.mark_started("running-key", "A", {"model": "x"})  # unfinished: not exported
    export = tmp_path / "out" / "results.jsonl"
    assert store.export_jsonl(export) == 3
    assert sorted(os.listdir(export.parent)) == ["results.jsonl"]  # no temp file left over
    assert all(json.loads(line)["key"] for line in export.read_text().splitlines())
    with ResultStore(tmp_path / "fresh.sqlite") as fresh:
        assert fresh.import_jsonl(export) == ImportOutcome(imported=3, skipped=0, conflicts=())
        for experiment in (None, "A", "B"):
            pd.testing.assert_frame_equal(fresh.results_frame(experiment),
                                          store.results_frame(experiment))
        pd.testing.assert_frame_equal(fresh.coefficients_frame(), store.coefficients_frame())
        assert fresh.get_result(make_result().key) == store.get_result(make_result().key)
        assert fresh.import_jsonl(export) == ImportOutcome(imported=0, skipped=3, conflicts=())
    assert store.export_jsonl(tmp_path / "b.jsonl", experiment="B") == 1


def test_import_reports_a_conflicting_line_keeps_the_stored_result_and_imports_the_rest(store, tmp_path):
    store.record(make_result())
    lines = [make_result(BASE_SPEC, label="pre-trained"), make_result(gsm8k=0.9)]
    source = tmp_path / "in.jsonl"
    with ResultStore(tmp_path / "other.sqlite") as other:
        for result in lines:
            other.record(result, replace=True)
        other.export_jsonl(source)
    order = [json.loads(line)["model_label"] for line in source.read_text().splitlines()]
    outcome = store.import_jsonl(source)
    assert (outcome.imported, outcome.skipped) == (1, 0)
    [conflict] = outcome.conflicts
    assert (conflict.line, conflict.key, conflict.differ) == (order.index("TIES") + 1, make_result().key,
                                                              ("scores",))
    assert store.has_result(content_key(BASE_SPEC))
    assert store.get_result(make_result().key).scores[0].value == 0.42


@pytest.mark.parametrize("bad_line, reason", [
    ("{not json", "not a merge-harness job result"),
    ('{"key": "k", "experiment": "e"}', "missing fields"),
    ('{"key": "k", "experiment": "e", "model_label": "m", "spec": {}, '
     '"scores": [{"task": "t", "metric": "m", "value": NaN}]}', "NaN is not valid JSON"),
    ('{"key": "k", "experiment": "e", "model_label": "m", "spec": {}, '
     '"scores": [{"task": "t", "metric": "m", "value": "high"}]}', "not a number"),
    ('{"key": "k", "experiment": "e", "model_label": "m", "spec": {}, "scores": [1]}',
     "not a merge-harness job result"),
    ("[1, 2]", "expected a JSON object"),
])
def test_import_rejects_a_malformed_line_with_its_number(store, tmp_path, bad_line, reason):
    good = json.dumps({"key": "good", "experiment": "e", "model_label": "m", "spec": {},
                       "scores": [{"task": "t", "metric": "acc", "value": 1.0}]})
    source = tmp_path / "in.jsonl"
    source.write_text(f"{good}\n\n{bad_line}\n")
    with pytest.raises(StoreError, match=rf"in\.jsonl:3: .*{reason}.*nothing was imported"):
        store.import_jsonl(source)
    assert store.jobs() == []


@pytest.mark.parametrize("content", [os.urandom(4096), b"SQLite format 3\x00" + b"\x10" * 40])
def test_a_corrupt_file_is_refused_with_a_clear_error(tmp_path, content):
    path = tmp_path / "results.sqlite"
    path.write_bytes(content)
    with pytest.raises(StoreError, match="is not a merge-harness result store .corrupt or not"):
        ResultStore(path)


def test_a_truncated_store_is_refused(tmp_path):
    path = tmp_path / "results.sqlite"
    with ResultStore(path) as store:
        store.record(make_result())
    path.write_bytes(path.read_bytes()[:60])
    with pytest.raises(StoreError, match="not a merge-harness result store"):
        ResultStore(path)


def test_another_sqlite_database_is_refused(tmp_path):
    path = tmp_path / "other.sqlite"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE notes (text TEXT)")
    with pytest.raises(StoreError, match="not a merge-harness result store.*notes"):
        ResultStore(path)


def test_a_store_locked_by_another_writer_fails_after_the_timeout(tmp_path):
    path = tmp_path / "results.sqlite"
    ResultStore(path).close()
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        with ResultStore(path, timeout_s=0.2) as store:  # reading still works under WAL
            assert store.jobs() == []
            started = time.monotonic()
            with pytest.raises(StoreError, match="is locked by another process"):
                store.record(make_result())
            assert 0.15 < time.monotonic() - started < 5
        other.execute("ROLLBACK")
        with ResultStore(path, timeout_s=0.2) as store:
            store.record(make_result())
            assert store.has_result(make_result().key)
    finally:
        other.close()


def test_an_older_store_migrates_forward_keeping_its_results(tmp_path):
    path = tmp_path / "results.sqlite"
    conn = sqlite3.connect(path, isolation_level=None)
    assert migrate(conn, str(path), MIGRATIONS[:1]) == 1
    conn.execute("INSERT INTO experiments (name, created_at, updated_at) VALUES ('old', 't', 't')")
    conn.execute("INSERT INTO jobs (key, experiment, label, spec_json, status, created_at) "
                 "VALUES ('k1', 'old', 'TA', '{\"merge\":{\"method\":\"task_arithmetic\"}}', "
                 "'done', 't')")
    conn.execute("INSERT INTO scores VALUES ('k1', 'gsm8k', 'exact_match', 0.25, NULL, 10)")
    conn.close()
    with ResultStore(path) as store:
        assert store.schema_version() == len(MIGRATIONS) >= 2
        frame = store.results_frame("old")  # needs 0002's backfilled experiment_jobs
        assert frame[["key", "method", "value"]].values.tolist() == [
            ["k1", "task_arithmetic", 0.25]]
    with sqlite3.connect(path) as conn:
        names = [r[0] for r in conn.execute("SELECT name FROM schema_migrations ORDER BY id")]
    assert names == [name for name, _ in MIGRATIONS]


def test_a_store_from_a_newer_harness_is_refused(tmp_path):
    path = tmp_path / "results.sqlite"
    ResultStore(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute("INSERT INTO schema_migrations VALUES (?, '9999_future', 't')",
                     (len(MIGRATIONS) + 1,))
    with pytest.raises(StoreError, match="newer merge-harness"):
        ResultStore(path)


def test_a_failure_mid_record_leaves_no_partial_rows(store):
    nan_second = make_result(scores=[Score("gsm8k", "exact_match", 0.4),
                                     Score("mbpp", "pass@1", math.nan)])
    with pytest.raises(StoreError, match="rejected by the schema.*scores.value"):
        store.record(nan_second)
    assert set(count_rows(store.path, nan_second.key).values()) == {0}
    store.mark_started(nan_second.key, "exp", nan_second.spec)
    with pytest.raises(StoreError):
        store.record(nan_second)
    assert not store.has_result(nan_second.key)
    assert count_rows(store.path, nan_second.key)["scores"] == 0
    assert [j["status"] for j in store.jobs()] == ["running"]


def test_job_status_shows_killed_and_failed_runs(tmp_path):
    path = tmp_path / "results.sqlite"
    result = make_result()
    with ResultStore(path) as store:
        store.mark_pending(result.key, "exp", result.spec, label="TIES")
        assert store.jobs()[0]["status"] == "pending"
        store.mark_started(result.key, "exp", result.spec)
    with ResultStore(path) as store:  # the run was killed: still visibly running
        [job] = store.jobs("exp")
        assert (job["status"], job["label"], job["started_at"] is not None) == (
            "running", "TIES", True)
        store.mark_failed(result.key, "CUDA out of memory")
        assert (store.jobs()[0]["status"], store.jobs()[0]["error"]) == (
            "failed", "CUDA out of memory")
        store.mark_started(result.key, "exp", result.spec)
        assert store.jobs()[0]["error"] is None
        store.record(result)
        store.mark_failed(result.key, "late failure")
        store.mark_started(result.key, "exp", result.spec)
        assert store.jobs()[0]["status"] == "done" and store.has_result(result.key)
        with pytest.raises(StoreError, match="no job"):
            store.mark_failed("unknown", "boom")


def test_wal_mode_and_foreign_keys_are_on(store):
    with sqlite3.connect(store.path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store._conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1


def test_ensure_experiment_upserts_its_config(store):
    store.ensure_experiment("exp", {"tasks": ["gsm8k"]})
    store.ensure_experiment("exp", {"tasks": ["gsm8k", "mbpp"]})
    with sqlite3.connect(store.path) as conn:
        rows = conn.execute("SELECT name, config_json FROM experiments").fetchall()
    assert rows == [("exp", '{"tasks":["gsm8k","mbpp"]}')]


def test_an_unusable_store_path_is_a_clear_error(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    with pytest.raises(StoreError, match="cannot create the directory"):
        ResultStore(blocker / "results.sqlite")
    with pytest.raises(StoreError, match="is a directory"):
        ResultStore(tmp_path)
