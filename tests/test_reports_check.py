"""The regression check: golden files, tolerances in points, stderr multiples, JUnit and Markdown.

Values in the fixture store are in lm-eval units: exact_match / pass@1 in 0-1 (stderr 0.02, i.e.
2 points), BLEU / chrF in 0-100 (stderr 0.8). A tolerance of 0.5 points allows 0.005 of a 0-1
metric and 0.5 BLEU.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import xml.etree.ElementTree as ET

import pytest

from merge_harness.core.errors import ConfigError
from merge_harness.core.results import Score
from merge_harness.reports import commands
from merge_harness.reports.check import (
    Tolerance,
    check,
    golden_data,
    junit_xml,
    load_golden,
    summary_markdown,
    write_golden,
)
from merge_harness.store.database import ResultStore
from tests.test_reports import EXPERIMENT, MODELS, build_store, job_result

TIES_GSM8K = ("ties", "gsm8k_fixture", "exact_match,strict-match")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(store path, its results frame, the golden data recorded from it)."""
    path = build_store(tmp_path_factory.mktemp("check") / "results.sqlite")
    with ResultStore(path) as store:
        frame = store.results_frame(EXPERIMENT)
    return path, frame, golden_data(frame, EXPERIMENT)


def shifted(frame, label, task, metric, by):
    """A copy of the results frame with one value moved by `by` (lm-eval units)."""
    frame = frame.copy()
    where = (frame["label"] == label) & (frame["task"] == task) & (frame["metric"] == metric)
    assert where.sum() == 1
    frame.loc[where, "value"] += by
    return frame


def statuses(result):
    return {(v.label, v.task, v.metric): v.status for v in result.verdicts if v.status != "pass"}


def test_unchanged_results_pass(built):
    _, frame, golden = built
    result = check(frame, golden)
    assert result.exit_code == 0 and result.count("pass") == len(frame) == len(golden["results"])
    assert golden["versions"] == {"harness": ["0.1.0"], "lm_eval": ["0.4.8"]}


def test_injected_regression_fails_and_names_the_metric(built):
    _, frame, golden = built
    result = check(shifted(frame, *TIES_GSM8K, by=-0.05), golden, Tolerance(points=0.5))
    assert result.exit_code == 1 and statuses(result) == {TIES_GSM8K: "regressed"}
    (failed,) = result.failed
    assert failed.diff_points == pytest.approx(-5.0)
    assert "ties / gsm8k_fixture / exact_match,strict-match: regressed" in failed.message
    summary = summary_markdown(result, "golden.json")
    assert "FAILED" in summary
    assert "**regressed** | ties | gsm8k_fixture | `exact_match,strict-match`" in summary


def test_tolerance_is_in_points_of_the_metric_scale(built):
    _, frame, golden = built
    assert check(shifted(frame, *TIES_GSM8K, by=-0.004), golden, Tolerance(0.5)).exit_code == 0
    assert check(shifted(frame, *TIES_GSM8K, by=-0.006), golden, Tolerance(0.5)).exit_code == 1
    bleu = ("ties", "wmt22_zh_en_fixture", "bleu")  # 0-100 already: 0.4 BLEU is 0.4 points
    assert check(shifted(frame, *bleu, by=-0.4), golden, Tolerance(0.5)).exit_code == 0
    assert check(shifted(frame, *bleu, by=-1.5), golden, Tolerance(0.5)).exit_code == 1
    per_metric = Tolerance(0.5, per_metric={"bleu": 2.0})
    assert check(shifted(frame, *bleu, by=-1.5), golden, per_metric).exit_code == 0
    per_task = Tolerance(0.5, per_metric={"wmt22_zh_en_fixture:bleu": 2.0})
    assert check(shifted(frame, *bleu, by=-1.5), golden, per_task).exit_code == 0


def test_stderr_multiple_tolerance_is_noise_aware(built):
    _, frame, golden = built
    moved = shifted(frame, *TIES_GSM8K, by=-0.03)  # 3 points; stderr of the difference 2.83
    assert check(moved, golden, Tolerance(0.5)).exit_code == 1
    assert check(moved, golden, Tolerance(0.5, stderr_multiple=2)).exit_code == 0
    assert check(moved, golden, Tolerance(0.5, stderr_multiple=1)).exit_code == 1
    (verdict,) = check(moved, golden, Tolerance(0.5, stderr_multiple=1)).failed
    assert verdict.allowed_points == pytest.approx(2 * 2 ** 0.5)


def test_improvement_passes_but_is_reported(built):
    _, frame, golden = built
    result = check(shifted(frame, *TIES_GSM8K, by=0.05), golden)
    assert result.exit_code == 0 and statuses(result) == {TIES_GSM8K: "improved"}
    assert "update the golden file" in junit_xml(result)


def test_missing_rows_fail_instead_of_passing(built):
    _, frame, golden = built
    result = check(frame[frame["label"] != "dare_ties"], golden)
    assert result.exit_code == 1 and result.count("missing") == 5
    assert all(v.label == "dare_ties" for v in result.failed)
    empty = check(frame.iloc[0:0], golden)
    assert empty.exit_code == 1 and empty.count("missing") == len(golden["results"])


def test_new_rows_are_reported_as_skipped(built):
    _, frame, golden = built
    trimmed = dict(golden, results=[r for r in golden["results"] if r["label"] != "ties"])
    result = check(frame, trimmed)
    assert result.exit_code == 0 and result.count("new") == 5
    suite = ET.fromstring(junit_xml(result)).find("testsuite")
    assert suite.get("skipped") == "5" and len(suite.findall("testcase/skipped")) == 5


def test_junit_xml_has_the_required_elements(built):
    _, frame, golden = built
    result = check(shifted(frame, *TIES_GSM8K, by=-0.05), golden)
    root = ET.fromstring(junit_xml(result))
    assert root.tag == "testsuites"
    (suite,) = root.findall("testsuite")
    for attribute in ("name", "tests", "failures", "errors"):
        assert suite.get(attribute) is not None, attribute
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors")) == (str(len(frame)), "1", "0")
    cases = suite.findall("testcase")
    assert len(cases) == len(frame) and all(c.get("name") and c.get("classname") for c in cases)
    (failure,) = suite.findall("testcase/failure")
    assert "exact_match,strict-match" in failure.get("message") and failure.get("type") == "regressed"


def test_golden_file_round_trip_and_errors(built, tmp_path):
    _, frame, _ = built
    path = write_golden(frame, tmp_path / "golden.json", EXPERIMENT)
    data = load_golden(path)
    assert data["experiment"] == EXPERIMENT and len(data["results"]) == len(frame)
    assert not list(tmp_path.glob("*.tmp"))
    other = frame.assign(experiment="other")
    with pytest.raises(ConfigError, match="recorded for experiment 'demo', but the results are of"):
        check(other, data)
    with pytest.raises(ConfigError, match="does not exist; record one with"):
        load_golden(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text(json.dumps({"experiment": "demo"}))
    with pytest.raises(ConfigError, match="not a merge-harness golden file"):
        load_golden(tmp_path / "bad.json")


def test_run_check_end_to_end_on_a_changed_store(built, tmp_path):
    """--update records the golden; a method change (re-recorded result) makes check exit 1."""
    source_path, _, _ = built
    path = tmp_path / "results.sqlite"
    shutil.copy(source_path, path)
    golden, junit, summary = tmp_path / "golden.json", tmp_path / "junit.xml", tmp_path / "summary.md"
    with ResultStore(path) as store:
        updated = commands.run_check(store, None, golden, update=True)
        assert updated.exit_code == 0 and golden.is_file()
        assert commands.run_check(store, None, golden, junit=junit).exit_code == 0
        result = job_result("slta (granularity=layer)", "humaneval_sandboxed_fixture")
        worse = [dataclasses.replace(s, value=s.value - 0.1) if s.metric == "pass@1" else s
                 for s in result.scores]
        store.record(dataclasses.replace(result, scores=worse), replace=True)
        outcome = commands.run_check(store, EXPERIMENT, golden, Tolerance(0.5),
                                     junit=junit, summary=summary)
        assert outcome.exit_code == 1
        assert "slta (granularity=layer) / humaneval_sandboxed_fixture / pass@1" in summary.read_text()
        assert ET.parse(junit).getroot().find("testsuite").get("failures") == "1"
        with pytest.raises(ConfigError, match="recorded for experiment 'demo', not 'demo2'"):
            commands.run_check(store, "demo2", golden)


def test_golden_update_needs_a_known_experiment(tmp_path):
    path = build_store(tmp_path / "two.sqlite", labels=["pre-trained"])
    build_store(path, experiment="other", labels=["math"])
    with ResultStore(path) as store:
        with pytest.raises(ConfigError, match=r"several experiments \(demo, other\)"):
            commands.run_check(store, None, tmp_path / "golden.json", update=True)
        with pytest.raises(ConfigError, match="experiments with results: demo, other"):
            commands.run_check(store, "nope", tmp_path / "golden.json", update=True)
    assert set(MODELS) >= {"pre-trained", "math"}
    assert Score  # the store's own record type is what the fixture writes


def test_primary_only_checks_the_declared_metric_of_each_task(built):
    """gsm8k's primary metric is strict-match (its YAML declares it): a drop in flexible-extract
    fails a full check and passes a primary-only one; a strict-match drop fails both."""
    _, frame, golden = built
    flexible = ("ties", "gsm8k_fixture", "exact_match,flexible-extract")
    assert (frame["metric"] == flexible[2]).any()  # the store records both of gsm8k's metrics
    secondary = shifted(frame, *flexible, by=-0.05)
    assert check(secondary, golden).exit_code == 1
    assert check(secondary, golden, primary_only=True).exit_code == 0
    assert check(shifted(frame, *TIES_GSM8K, by=-0.05), golden, primary_only=True).exit_code == 1
    assert "`exact_match,strict-match` (primary)" in summary_markdown(check(frame, golden))
