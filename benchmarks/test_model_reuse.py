"""One model per run: per-job build time and peak RSS with and without model reuse, same scores.

    .venv/bin/pytest benchmarks/test_model_reuse.py --benchmark-only -q -s

The real SmolLM2-135M (float32) and three stand-in fine-tunes (seeded noise on the attention and
MLP weights) are merged by six jobs (task arithmetic at four lambdas, TIES, linear), each
evaluated on 2 toy_math rows, by `merge-harness run`'s local executor in a child process: once
merging every job into one reused model (`LocalExecutor(reuse_models=True)`, the default) and
once building a fresh state dict and model per job. Each job's `build` seconds and peak RSS come
from the store, as `run` records them. Scores must be identical.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from benchmarks.conftest import BENCH_DIR, CACHE_DIR, perturbed

RESULTS = BENCH_DIR / "results" / "model_reuse.json"
smollm2 = pytest.importorskip("merge_harness.zoo.smollm2")

CHILD = """
import json, sys, torch
from merge_harness.run.driver import LocalExecutor
from merge_harness.run.experiment import load_experiment
from merge_harness.run.runner import run_experiment
from merge_harness.store.database import ResultStore
torch.set_num_threads(1)
path, reuse = sys.argv[1], sys.argv[2] == "reuse"
experiment = load_experiment(path)
with ResultStore(experiment.store) as store:
    summary = run_experiment(experiment, store, LocalExecutor(reuse_models=reuse), show_progress=False)
    assert not summary.failed, summary.failed
    frame = store.results_frame(experiment.name)
rows = frame.drop_duplicates("key").sort_values("key")
print(json.dumps({"labels": rows["label"].tolist(), "build_s": rows["time_build"].tolist(),
                  "merge_s": rows["time_merge"].tolist(), "peak_rss_mb": rows["peak_rss_mb"].tolist(),
                  "scores": dict(zip(rows["label"] + "/" + rows["metric"], rows["value"]))}))
"""


def experiment_file(root: Path, base: Path, models: list[Path], reuse: bool) -> Path:
    tag = "reuse" if reuse else "fresh"
    finetunes = "".join(f"  ft{i}: {{model: {model}, task: toy_math}}\n" for i, model in enumerate(models))
    path = root / f"{tag}.yaml"
    path.write_text(
        f"name: model-reuse-{tag}\nbase_model: {base}\nbaselines: false\nfinetunes:\n{finetunes}"
        + textwrap.dedent("""\
            methods:
              - method: task_arithmetic
                grid: {lambda: [0.3, 0.5, 0.7, 1.0]}
              - method: ties
                parameters: {density: 0.5, lambda: 1.0}
              - method: linear
            tasks: [toy_math]
            evaluation: {limit: 2, apply_chat_template: true, gen_kwargs: {max_gen_toks: 16}}
            """)
        + f"store: {root / tag}.sqlite\n"
    )
    return path


def test_model_reuse_build_time_and_rss(benchmark, tmp_path):
    base = smollm2.convert_smollm2()
    models = [perturbed(base, CACHE_DIR / "slta-smollm2" / f"ft_{seed}", seed) for seed in (1, 2, 3)]
    rows = {}
    for reuse in (False, True, False, True):  # interleaved: each pair sees the same machine load
        root = tmp_path / f"round{len(rows)}"
        root.mkdir()
        path = experiment_file(root, base, models, reuse)
        done = subprocess.run([sys.executable, "-c", CHILD, str(path), "reuse" if reuse else "fresh"],
                              capture_output=True, text=True, timeout=1800)
        assert done.returncode == 0, done.stderr[-2000:]
        label = f"{'reuse' if reuse else 'fresh'} {len(rows) // 2 + 1}"
        rows[label] = json.loads(done.stdout.splitlines()[-1])
    scores = [row.pop("scores") for row in rows.values()]
    assert all(s == scores[0] for s in scores)  # reuse changes no score
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(rows, indent=2) + "\n")
    print(json.dumps(rows, indent=2))
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
