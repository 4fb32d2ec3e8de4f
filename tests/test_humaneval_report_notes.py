"""A report says, in its notes, how many HumanEval samples the sandbox could not run or timed out."""

from __future__ import annotations

import json

import pandas as pd

from merge_harness.reports.frame import build_table


def results(errors: float, timeouts: float) -> pd.DataFrame:
    records = []
    for label, method in [("pre-trained", None), ("ties", "ties")]:
        spec = {"kind": "merge" if method else "base",
                **({"merge": {"method": method, "parameters": {}}} if method else {})}
        for metric, value in [("pass@1", 0.5), ("sandbox_errors", errors if method else 0.0),
                              ("timeouts", timeouts)]:
            records.append({"experiment": "code", "label": label, "method": method,
                            "task": "humaneval_sandboxed", "metric": metric, "value": value,
                            "spec_json": json.dumps(spec), "peak_rss_mb": None})
    return pd.DataFrame.from_records(records)


def test_notes_count_sandbox_errors_and_timeouts_per_row():
    table = build_table(results(errors=3.0, timeouts=1.0), {})
    assert [c.metric for c in table.columns] == ["pass@1"]
    notes = table.all_notes()
    assert "HumanEval: samples the sandbox could not run (left out of pass@k): TIES 3." in notes
    assert "HumanEval: samples that timed out: Pre-trained 1; TIES 1." in notes


def test_no_note_when_every_sample_ran_in_time():
    notes = build_table(results(errors=0.0, timeouts=0.0), {}).all_notes()
    assert not [note for note in notes if "sandbox" in note or "timed out" in note]
