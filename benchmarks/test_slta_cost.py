"""SLTA's cost on the real SmolLM2-135M shape: N=30 calibration examples, T=3 fine-tunes.

    .venv/bin/pytest benchmarks/test_slta_cost.py --benchmark-only -q -s

Each merge runs in a child process (`benchmarks/merge_runner.py`) so that its peak RSS is its own.
SLTA at `layer` and `attn_mlp` granularity is compared with task arithmetic on the same models;
the forward-pass count comes from the merge's own record (`slta_coefficients.json`). Target:
SLTA costs no more than one forward of each model per task's calibration set plus the
task-arithmetic merge.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.conftest import run_merge_child, smollm2_entries

BENCH_DIR = Path(__file__).parent
RESULTS = BENCH_DIR / "results" / "slta_cost.json"
N = 30

pytest.importorskip("merge_harness.zoo.smollm2")


def test_slta_cost_vs_task_arithmetic(benchmark, tmp_path_factory):
    base, entries = smollm2_entries(rows=N * 2)
    out = tmp_path_factory.mktemp("slta")
    rows = {}
    for label, method, params in (
        ("task_arithmetic", "task_arithmetic", {"lambda": 0.5}),
        ("slta layer", "slta", {"granularity": "layer", "num_samples": N}),
        ("slta attn_mlp", "slta", {"granularity": "attn_mlp", "num_samples": N}),
    ):
        config = {
            "method": method,
            "base_model": str(base),
            "models": entries,
            "parameters": params,
            "calibration": {"template": "chat", "max_length": 256},
        }
        target = out / label.replace(" ", "_")
        rows[label] = run_merge_child(config, target, keep=True)
        record = target / "slta_coefficients.json"
        if record.exists():
            rows[label]["forward_passes"] = json.loads(record.read_text())["forward_passes"]
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(rows, indent=2) + "\n")
    print(json.dumps(rows, indent=2))
    benchmark.extra_info.update({k: v["merge_s"] for k, v in rows.items()})
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    for label in ("slta layer", "slta attn_mlp"):
        passes = rows[label]["forward_passes"]
        assert all(count <= 1.0 + 1e-9 for count in passes.values()), passes
