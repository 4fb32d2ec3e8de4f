"""The README's main command on a reduced zoo: every artifact exists, every method has a row."""

from __future__ import annotations

import subprocess
import sys

import pandas as pd
import pytest

from merge_harness.merge.methods import method_registry
from merge_harness.reports.metrics import task_title
from merge_harness.zoo.demo import demo_methods


def test_demo_covers_every_registered_method():
    assert {run.method for run in demo_methods(["math", "code"])} == set(method_registry())


@pytest.mark.slow
def test_demo_on_the_ci_zoo_writes_every_artifact(tmp_path):
    out = tmp_path / "demo"
    command = [sys.executable, "-m", "merge_harness", "demo", "--size", "ci", "--limit", "6", "--quiet",
               "--out", str(out), "--zoo-dir", str(tmp_path / "zoo")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    report = out / "report"
    assert (out / "results.sqlite").is_file() and (report / "leaderboard.html").is_file()
    for suffix in ("md", "tex", "csv", "json"):
        assert (report / f"demo-toy-ci-limit6.{suffix}").is_file(), suffix
    assert list((report / "plots").glob("*.png")) and list((report / "plots").glob("*.svg"))
    table = pd.read_csv(report / "demo-toy-ci-limit6.csv")
    merges = table[table["kind"] == "merge"]
    assert len(merges) == len(demo_methods(["math", "code"])) + 1  # task arithmetic runs a 2-point grid
    assert set(merges["method"]) == set(method_registry())
    for task in ("toy_math", "toy_code", "toy_translate", "toy_qa"):
        column = task_title(task)
        assert pd.to_numeric(table[column], errors="coerce").notna().all(), task
    assert "demo finished" in result.stdout
    noise = ("model kwarg is not of type", "Custom kwargs can be passed", "fatal: not a git repository",
             "Writing model shards")
    console = (result.stdout + result.stderr).splitlines()
    assert not [line for line in console if any(n in line for n in noise)]
    log = (out / "results.log").read_text()  # third-party output went next to the store
    assert "lm_eval" in log or "model kwarg is not of type" in log
    again = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and ", 0 computed" in again.stdout  # everything reused
