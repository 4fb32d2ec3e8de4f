"""Peak memory of the data-driven methods (SLTA, RegMean, Fisher) on the SmolLM2-135M shape.

    .venv/bin/pytest benchmarks/test_data_driven_memory.py --benchmark-only -q -s

Each merge runs to disk in a child process (`benchmarks/merge_runner.py`, one torch thread) on
the real SmolLM2-135M and three perturbed copies (T = 3, float32, 513 MB each), with 8
calibration examples of 128 tokens per task. Peak memory is the child's high-water resident set
(`VmHWM`): `ru_maxrss` would carry over the parent's (this pytest process's) resident set
through fork and exec. Each method must stay under

    bound = rss_after_import + ALLOWANCE_MB + k x model,

rss_after_import being the interpreter with torch and the engine loaded. The terms of k are the
model-sized buffers a method holds at once, plus what glibc keeps resident of freed model-sized
buffers (`keep_freed_memory`, as `merge-harness merge` sets it):

- SLTA, k = 2.5: the base model during the feature stream (1; its heap pages stay resident after it
  is dropped), then the embedding's combine: base, T task vectors and the result, (T + 2) x 108 MB
  (1.05 on this vocabulary-heavy shape); every other merged tensor is written as it is made.
- RegMean, k = 4: the base model and the solved linear weights while the Grams stream (1 + 0.8),
  then the embedding's average, (T + 2) x 108 MB (1.05), and the freed-but-resident heap.
- Fisher, k = 6.5: one fine-tune's network, its Fisher sums and the two accumulators (4), the
  tied embedding's gradient and its square (2 x 0.2), and the freed-but-resident heap of the
  previous fine-tune's network and gradients (1 to 1.6 in repeated runs).

Repeated runs vary by up to 0.8 x model (where glibc places freed blocks); each k is the worst
seen in three runs plus about 5%.

ALLOWANCE_MB covers calibration: the tokenizer (about 170 MB once loaded), the token batches, the
activations of one layer for every task, and for Fisher the logits over the 49,152-token vocabulary.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.conftest import run_merge_child, smollm2_entries

BENCH_DIR = Path(__file__).parent
RESULTS = BENCH_DIR / "results" / "data_driven_memory.json"
N, MAX_LENGTH = 8, 128
ALLOWANCE_MB = 256
METHODS = {  # label: (method, parameters, k)
    "slta layer": ("slta", {"granularity": "layer"}, 2.5),
    "slta attn_mlp": ("slta", {"granularity": "attn_mlp"}, 2.5),
    "regmean": ("regmean", {}, 4.0),
    "fisher": ("fisher", {}, 6.5),
}
pytest.importorskip("merge_harness.zoo.smollm2")


def test_data_driven_peak_memory_stays_under_its_bound(benchmark, tmp_path_factory):
    base, entries = smollm2_entries(rows=60)
    model_mb = sum(f.stat().st_size for f in base.glob("*.safetensors")) / 1024**2
    out = tmp_path_factory.mktemp("data_driven_memory")
    rows = {}
    for label, (method, params, k) in METHODS.items():
        config = {
            "method": method,
            "base_model": str(base),
            "models": entries,
            "parameters": {**params, "num_samples": N},
            "calibration": {"template": "chat", "max_length": MAX_LENGTH},
        }
        row = run_merge_child(config, out / label.replace(" ", "_"), threads=1)
        bound = row["rss_after_import_mb"] + ALLOWANCE_MB + k * model_mb
        above_import = row["peak_rss_mb"] - row["rss_after_import_mb"]
        rows[label] = {
            **row,
            "model_mb": round(model_mb, 1),
            "k": k,
            "allowance_mb": ALLOWANCE_MB,
            "bound_mb": round(bound, 1),
            "peak_above_import_x_model": round(above_import / model_mb, 2),
        }
        print(f"{label:<15} peak {row['peak_rss_mb']:7.0f} MB  bound {bound:7.0f} MB  "
              f"({above_import / model_mb:.2f} x model above the import baseline)")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(rows, indent=2) + "\n")
    benchmark.extra_info.update({label: row["peak_rss_mb"] for label, row in rows.items()})
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    for label, row in rows.items():
        assert row["peak_rss_mb"] <= row["bound_mb"], (label, row)
