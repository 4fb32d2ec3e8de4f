"""Uncertainty in the tables: the paired bootstrap, stderr as "±", bold only for an untied best."""

from __future__ import annotations

import numpy as np
import pytest

from merge_harness.reports.frame import TableOptions, build_table
from merge_harness.reports.markdown import render_markdown
from merge_harness.reports.significance import paired_bootstrap, paired_test, sample_scores
from tests.test_reports import HAND_FINETUNES, hand_results


def test_a_merge_better_on_every_document_has_the_smallest_p_value():
    test = paired_bootstrap(np.ones(30), np.zeros(30), resamples=2000)
    assert test.difference == 1.0 and test.p_value == pytest.approx(1 / 2000) and test.significant
    assert (test.low, test.high) == (1.0, 1.0)


def test_identical_answers_and_symmetric_differences_are_not_significant():
    assert paired_bootstrap(np.full(20, 0.5), np.full(20, 0.5)).p_value == 1.0
    flips = np.array([1.0, 0.0] * 20)
    assert paired_bootstrap(flips, 1 - flips).p_value > 0.5


def test_the_bootstrap_interval_matches_the_normal_approximation_on_many_documents():
    """An independent reference: for n = 2000 binary outcomes the bootstrap interval of the mean
    difference is mean +- 1.96 sd / sqrt(n) to within a few percent."""
    rng = np.random.default_rng(1)
    a, b = (rng.random(2000) < 0.55).astype(float), (rng.random(2000) < 0.50).astype(float)
    test = paired_bootstrap(a, b, resamples=4000, seed=3)
    diff = a - b
    half = 1.96 * diff.std(ddof=1) / np.sqrt(len(diff))
    assert test.low == pytest.approx(diff.mean() - half, abs=0.15 * half)
    assert test.high == pytest.approx(diff.mean() + half, abs=0.15 * half)


def samples(values, task="gsm8k_fixture", metric="exact_match", filter_name="strict-match"):
    return [{"task": task, "doc_id": i, "filter": filter_name, "metrics": {metric: v}}
            for i, v in enumerate(values)]


def test_sample_scores_reads_the_metric_and_filter_and_skips_corpus_level_metrics():
    logs = samples([1, 0, 1]) + samples([0, 0, 0], filter_name="flexible-extract")
    assert list(sample_scores(logs, "gsm8k_fixture", "exact_match,strict-match")) == [1, 0, 1]
    bleu = [{"task": "wmt", "doc_id": 0, "filter": "none", "metrics": {"bleu": [["ref"], "hyp"]}}]
    assert sample_scores(bleu, "wmt", "bleu").empty
    assert paired_test(sample_scores(logs, "gsm8k_fixture", "exact_match,strict-match"),
                       sample_scores([], "gsm8k_fixture", "exact_match")) is None


def test_the_paired_block_marks_a_significantly_better_merge_against_task_arithmetic():
    rows = 40
    logs = {"TA 1.0": samples([i % 3 == 0 for i in range(rows)]),  # 14 of 40 right
            "TIES": samples([i % 3 != 2 for i in range(rows)]),  # 27 of 40: better on 13 docs, worse on none
            "TA 0.5": samples([i % 3 == 0 for i in range(rows)])}  # the same answers as the baseline
    table = build_table(hand_results(), HAND_FINETUNES, TableOptions(costs=False), samples=logs)
    paired = table.block("paired")
    assert paired is not None and "TA 1.0" in paired.title
    assert paired.values.at["TIES", "GSM8K (fixture)"] < 0.01
    assert paired.values.at["TA 0.5", "GSM8K (fixture)"] == 1.0
    score = table.block("score")
    assert score.marks == {("TIES", "GSM8K (fixture)"): "*"}
    text = render_markdown(table)
    assert "**40.00***" in text  # bold (the best) and starred (significant)
    assert "Not tested (no per-document score, e.g. corpus-level BLEU): WMT22 zh-en (fixture)" in text


def test_without_stored_samples_the_table_says_there_is_no_paired_test():
    table = build_table(hand_results(), HAND_FINETUNES, TableOptions(costs=False),
                        samples={"TIES": samples([1, 0])})
    assert table.block("paired") is None
    assert any("No paired test" in note for note in table.all_notes())


def test_stderr_is_shown_as_plus_minus_in_points_when_asked():
    results = hand_results().assign(stderr=0.02)  # 0-1 units: 2 points for GSM8K; BLEU as is
    plain = render_markdown(build_table(results, HAND_FINETUNES, TableOptions(costs=False)))
    shown = render_markdown(build_table(results, HAND_FINETUNES, TableOptions(costs=False, stderr=True)))
    assert "±" not in plain
    assert "**40.00 ± 2.00**" in shown and "13.00 ± 0.02" in shown


def test_a_tied_best_is_not_bold():
    results = hand_results()
    results.loc[(results["label"] == "TA 1.0") & (results["metric"] == "exact_match,strict-match"),
                "value"] = 0.40  # ties TIES on GSM8K
    table = build_table(results, HAND_FINETUNES, TableOptions(costs=False))
    assert "GSM8K (fixture)" not in table.block("score").best
    assert table.block("score").best["WMT22 zh-en (fixture)"] == ["TA 1.0"]
