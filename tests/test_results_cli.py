"""`merge-harness results export|import` through the real CLI, on real SQLite stores: two
machines' runs of one experiment pooled, losslessly, by content key."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from merge_harness.store.database import ResultStore
from tests.conftest import write_experiment
from tests.test_bad_input import cli, one_error_line, tree_hashes
from tests.test_store import BASE_SPEC, make_result

TA = "  - method: task_arithmetic\n    parameters: {lambda: 0.5}\n"
TIES = "  - method: ties\n    parameters: {density: 0.5}\n"


def copy_store(source: Path, target: Path) -> Path:
    """A consistent copy of a store (its WAL included), for a test to change."""
    with sqlite3.connect(source) as src, sqlite3.connect(target) as dst:
        src.backup(dst)
    return target


@pytest.fixture(scope="module")
def machines(chat_zoo, tmp_path_factory) -> dict[str, Path]:
    """One experiment run in two halves, as on two machines: store 'a' with task arithmetic,
    store 'b' with TIES (the pre-trained model and the fine-tunes in both)."""
    root = tmp_path_factory.mktemp("machines")
    paths = {}
    for name, methods in (("a", TA), ("b", TIES)):
        store = root / f"{name}.sqlite"
        result = cli("run", str(write_experiment(root / f"{name}.yaml", chat_zoo, store, methods)), "--quiet")
        assert result.returncode == 0, result.stderr
        paths[name] = store
    paths["both"] = write_experiment(root / "both.yaml", chat_zoo, root / "unused.sqlite", TA + TIES)
    return paths


def frame_of(store: Path, experiment: str | None = None) -> pd.DataFrame:
    with ResultStore(store) as opened:
        return opened.results_frame(experiment)


def test_a_jsonl_export_imports_losslessly_and_pools_two_machines(machines, tmp_path):
    export = tmp_path / "a.jsonl"
    written = cli("results", "export", "--store", str(machines["a"]), "--format", "jsonl",
                  "--out", str(export))
    assert written.returncode == 0, written.stderr
    assert written.stdout.strip() == f"written: {export} (8 job records)"
    fresh = tmp_path / "fresh.sqlite"
    assert cli("results", "import", str(export), "--store", str(fresh)).returncode == 0
    pd.testing.assert_frame_equal(frame_of(fresh), frame_of(machines["a"]))
    with ResultStore(fresh) as copy, ResultStore(machines["a"]) as original:
        keys = set(frame_of(fresh)["key"])
        assert all(copy.get_result(key) == original.get_result(key) for key in keys)

    pooled = copy_store(machines["b"], tmp_path / "pooled.sqlite")
    first = cli("results", "import", str(export), "--store", str(pooled))
    assert first.returncode == 0, first.stderr
    # the pre-trained model and both fine-tunes on both tasks: same keys, same scores on both machines
    summary = f"{export} -> {pooled}: 2 imported, 6 skipped (already stored), 0 conflicts"
    assert first.stdout.strip() == summary
    again = cli("results", "import", str(export), "--store", str(pooled))
    assert "0 imported, 8 skipped (already stored), 0 conflicts" in again.stdout
    rerun = cli("run", str(machines["both"]), "--store", str(pooled), "--quiet")
    assert rerun.returncode == 0, rerun.stderr
    assert "10 jobs: 10 reused, 0 computed" in rerun.stdout  # imported keys are the keys a run computes


def test_csv_and_parquet_hold_the_results_frame_one_row_per_job_task_metric(machines, tmp_path):
    store = str(machines["b"])
    every = cli("results", "export", "--store", store, "--out", str(tmp_path / "all.csv"))
    assert every.returncode == 0, every.stderr
    frame = frame_of(machines["b"])
    table = pd.read_csv(tmp_path / "all.csv")
    assert list(table.columns) == list(frame.columns) and len(table) == len(frame)
    assert not table.duplicated(["key", "task", "metric"]).any()
    assert table["value"].tolist() == pytest.approx(frame["value"].tolist())

    chosen = ("--model", "ties", "--model", "math", "--task", "gsm8k_fixture")
    parquet = cli("results", "export", "--store", store, *chosen, "--format", "parquet",
                  "--out", str(tmp_path / "some.parquet"), "--experiment", "runner-test")
    assert parquet.returncode == 0, parquet.stderr
    rows = pd.read_parquet(tmp_path / "some.parquet")
    expected = frame.query("label in ['ties', 'math'] and task == 'gsm8k_fixture'")
    assert len(rows) == len(expected) > 0 and set(rows["label"]) == {"ties", "math"}
    assert sorted(rows["value"]) == pytest.approx(sorted(expected["value"]))
    assert parquet.stdout.strip() == f"written: {tmp_path / 'some.parquet'} ({len(expected)} rows)"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["all.csv", "some.parquet"]  # no temp files


def test_a_conflict_is_reported_and_overwrites_nothing(machines, tmp_path):
    export = tmp_path / "a.jsonl"
    assert cli("results", "export", "--store", str(machines["a"]), "--out", str(export)).returncode == 0
    lines = export.read_text().splitlines()
    record = json.loads(lines[0])
    record["scores"][0]["value"] += 0.25  # another machine measured something else for this key
    lines[0] = json.dumps(record)
    export.write_text("\n".join(lines) + "\n")
    target = copy_store(machines["a"], tmp_path / "a.sqlite")
    before = frame_of(target)
    result = cli("results", "import", str(export), "--store", str(target))
    assert result.returncode == 1
    assert f"{export}:1: job {record['key'][:12]} ({record['model_label']!r}" in result.stderr
    assert "stored with other scores; the stored result is kept" in result.stderr
    assert result.stdout.strip().endswith("0 imported, 7 skipped (already stored), 1 conflicts")
    pd.testing.assert_frame_equal(frame_of(target), before)


@pytest.fixture
def small_store(tmp_path) -> Path:
    with ResultStore(tmp_path / "store" / "results.sqlite") as store:
        store.record(make_result(experiment="A"))
        store.record(make_result(BASE_SPEC, experiment="A", label="pre-trained", coefficients=[]))
    return tmp_path / "store" / "results.sqlite"


BAD_EXPORTS = {
    "unknown model": (["--model", "TIE", "--out", "o.csv"], "--model 'TIE': not in", "did you mean 'TIES'"),
    "unknown task": (["--task", "gsm8", "--out", "o.csv"], "--task 'gsm8': not in", "(there: gsm8k, mbpp)"),
    "unknown metric": (["--metric", "acc", "--out", "o.csv"], "--metric 'acc': not in", "exact_match"),
    "unknown experiment": (["--experiment", "B", "--out", "o.csv"], "--experiment 'B': not in", "(there: A)"),
    "no such rows": (["--model", "TIES", "--metric", "pass@1", "--task", "gsm8k", "--out", "o.csv"],
                     "no result in", "matches --model TIES --task gsm8k --metric pass@1; nothing written"),
    "unknown format": (["--format", "xlsx", "--out", "o.csv"], "--format: 'xlsx' is not one of", "parquet"),
    "no format": (["--out", "o.xlsx"], "cannot tell the format from 'o.xlsx'", "csv, jsonl, parquet"),
    "rows of jsonl": (["--task", "gsm8k", "--out", "o.jsonl"], "--task/--metric select rows", "--model"),
    "store as out": (["--out", "{store}", "--format", "csv"], "is the result store itself", "elsewhere"),
    "no store": (["--out", "o.csv", "--store", "gone.sqlite"], "no result store at gone.sqlite", "--store"),
}


@pytest.mark.parametrize("case", list(BAD_EXPORTS))
def test_bad_export_input_is_one_line_exit_2_and_writes_nothing(small_store, tmp_path, case):
    args, *expected = BAD_EXPORTS[case]
    args = [a.replace("{store}", str(small_store)) for a in args]
    before = tree_hashes(tmp_path)
    command = [sys.executable, "-m", "merge_harness", "results", "export", "--store", str(small_store), *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    line = one_error_line(result.stderr)
    assert all(text in line for text in expected), line
    assert tree_hashes(tmp_path) == before


def test_a_malformed_import_is_one_line_exit_2_and_changes_no_store(small_store, tmp_path):
    export = tmp_path / "good.jsonl"
    with ResultStore(tmp_path / "other.sqlite") as other:
        other.record(make_result(label="other", gsm8k=0.5, spec={"merge": {"method": "ties"}}))
        other.export_jsonl(export)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(export.read_text() + '{"key": "k", "experiment": "e"}\n')
    before = tree_hashes(small_store.parent)
    existing = cli("results", "import", str(bad), "--store", str(small_store))
    assert existing.returncode == 2
    assert f"{bad}:2: not a merge-harness job result (missing fields" in one_error_line(existing.stderr)
    assert tree_hashes(small_store.parent) == before
    new = cli("results", "import", str(bad), "--store", str(tmp_path / "new" / "results.sqlite"))
    assert new.returncode == 2 and not (tmp_path / "new").exists()  # no store made for a bad file


def test_parquet_without_pyarrow_names_the_extra_to_install(small_store, tmp_path):
    shim = tmp_path / "shim" / "pyarrow"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ModuleNotFoundError('no pyarrow here', name='pyarrow')\n")
    command = [sys.executable, "-m", "merge_harness", "results", "export", "--store", str(small_store),
               "--format", "parquet", "--out", str(tmp_path / "o.parquet")]
    env = {**os.environ, "PYTHONPATH": str(shim.parent)}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 2
    assert one_error_line(result.stderr) == (
        "error: results export --format parquet needs the package 'pyarrow', which is not installed: "
        "pip install 'merge-harness[parquet]'")
    assert not (tmp_path / "o.parquet").exists()
