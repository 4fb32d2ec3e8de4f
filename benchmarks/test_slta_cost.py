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
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.conftest import perturbed

BENCH_DIR = Path(__file__).parent
RESULTS = BENCH_DIR / "results" / "slta_cost.json"
TASKS = ("math", "code", "qa")  # toy task generators standing in for the paper's data
N = 30

smollm2 = pytest.importorskip("merge_harness.zoo.smollm2")


def calibration_file(root: Path, task: str) -> Path:
    from merge_harness.zoo.toytasks import train_pairs  # the toy zoo's synthetic prompt/response pairs

    path = root / f"{task}_pairs.jsonl"
    if not path.exists():
        path.write_text("".join(json.dumps(pair) + "\n" for pair in train_pairs(task, N * 2, seed=1)))
    return path


def run_child(config: dict, out: Path) -> dict:
    config_file = out.with_suffix(".json")
    config_file.write_text(json.dumps(config))
    command = [sys.executable, str(BENCH_DIR / "merge_runner.py"), "ours", str(config_file), str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=1800, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_slta_cost_vs_task_arithmetic(benchmark, tmp_path_factory):
    root = BENCH_DIR / ".cache" / "slta-smollm2"
    base = smollm2.convert_smollm2()
    models = [perturbed(base, root / f"ft_{task}", seed) for seed, task in enumerate(TASKS, 1)]
    entries = [
        {"model": str(model), "calibration": str(calibration_file(root, task))}
        for model, task in zip(models, TASKS)
    ]
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
        rows[label] = run_child(config, target)
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
