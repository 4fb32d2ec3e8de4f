"""Memory and time model: each method family's peak RSS and wall time at three Llama shapes,
fitted against parameter count and extrapolated to Llama-3.2-3B, Llama-2-7B and Llama-2-13B.

    .venv/bin/pytest benchmarks/test_memory_model.py --benchmark-only -q -s     # ~20-30 min here

Shapes (random weights, the real Llama layer structure, SmolLM2's 49152-token vocabulary, tied
embeddings): `small` (~32M parameters), SmolLM2-135M and SmolLM2-360M. Each is stored as a
base and three fine-tunes (base + 0.01 N(0, 1) per tensor) in float32 and in bfloat16, with
SmolLM2's tokenizer for the calibrated methods. Every merge runs in its own child process
(`benchmarks/merge_runner.py ours`, one torch thread), so its peak RSS (`ru_maxrss`) is its
own; `rss_after_import_mb` is the interpreter with torch and the engine before any tensor.

Model-level methods calibrate on N = 4 examples per task of at most 64 tokens (their cost in
activations is small next to the weights at this N; `benchmarks/test_slta_cost.py` measures
N = 30). The fit is peak RSS = a + b x (model bytes) and time = c + d x parameters, least
squares over the three sizes, per method and dtype; `docs/performance.md` has the table.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.conftest import BENCH_DIR, CACHE_DIR, SMOLLM2_135M, run_merge_child

RESULTS = BENCH_DIR / "results" / "memory_model.json"
ROOT = CACHE_DIR / "memory-model-v1"
smollm2 = pytest.importorskip("merge_harness.zoo.smollm2")

SHAPES = {
    "small": {**SMOLLM2_135M, "hidden_size": 384, "intermediate_size": 1024, "num_hidden_layers": 8,
              "num_attention_heads": 6, "num_key_value_heads": 2},
    "135m": dict(SMOLLM2_135M),
    "360m": {**SMOLLM2_135M, "hidden_size": 960, "intermediate_size": 2560, "num_hidden_layers": 32,
             "num_attention_heads": 15, "num_key_value_heads": 5},
}
DTYPES = ("float32", "bfloat16")
METHODS = {
    "task_arithmetic": {"lambda": 1.0},
    "ties": {"density": 0.5, "lambda": 1.0},
    "dare_ties": {"density": 0.5, "lambda": 1.0},
    "slta_layer": {"granularity": "layer", "num_samples": 4},
    "slta_attn_mlp": {"granularity": "attn_mlp", "num_samples": 4},
    "regmean": {"num_samples": 4},
    "fisher": {"num_samples": 4},
}
CALIBRATED = {"slta_layer", "slta_attn_mlp", "regmean", "fisher"}
JOB = "job (task_arithmetic in memory + lm-eval)"
# Llama shapes to predict (parameter counts from their config.json; bytes = params x dtype size)
TARGETS = {"Llama-3.2-3B": 3.21e9, "Llama-2-7B": 6.74e9, "Llama-2-13B": 13.02e9}


def write_shape(name: str, dtype: str) -> dict[str, Path]:
    """Base + 3 fine-tunes of one shape in one dtype, with SmolLM2's tokenizer; built once."""
    from safetensors.torch import load_file, save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    root = ROOT / f"{name}-{dtype}"
    zoo = {"base": root / "base", **{f"ft{i}": root / f"ft{i}" for i in range(3)}}
    if (root / ".complete").exists():
        return zoo
    shutil.rmtree(root, ignore_errors=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SHAPES[name])).to(getattr(torch, dtype))
    model.save_pretrained(zoo["base"])
    del model
    tokenizer_dir = smollm2.convert_smollm2()
    for extra in tokenizer_dir.iterdir():
        if extra.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "chat_template")):
            shutil.copy2(extra, zoo["base"] / extra.name)
    for index in range(3):
        generator = torch.Generator().manual_seed(index + 1)
        state = load_file(zoo["base"] / "model.safetensors")
        for tensor in state.values():
            noise = torch.randn(tensor.shape, generator=generator).mul_(0.01)
            tensor.copy_(tensor.float().add_(noise).to(tensor.dtype))
        zoo[f"ft{index}"].mkdir(parents=True)
        save_file(state, zoo[f"ft{index}"] / "model.safetensors", metadata={"format": "pt"})
        for extra in zoo["base"].iterdir():
            if extra.suffix in {".json", ".jinja"}:
                shutil.copy2(extra, zoo[f"ft{index}"] / extra.name)
    (root / ".complete").write_text("done\n")
    return zoo


def calibration_files() -> list[Path]:
    from merge_harness.zoo.toytasks import train_pairs

    files = []
    for task in ("math", "code", "qa"):
        path = ROOT / f"{task}_pairs.jsonl"
        if not path.exists():
            path.write_text("".join(json.dumps(p) + "\n" for p in train_pairs(task, 16, seed=1)))
        files.append(path)
    return files


def merge_config(method: str, zoo: dict[str, Path], dtype: str) -> dict:
    params = dict(METHODS[method])
    name = "slta" if method.startswith("slta") else method
    models = [{"model": str(zoo[f"ft{i}"])} for i in range(3)]
    config = {"method": name, "base_model": str(zoo["base"]), "parameters": params, "out_dtype": dtype}
    if method in CALIBRATED:
        for entry, source in zip(models, calibration_files()):
            entry["calibration"] = {"source": str(source), "template": "chat"}
        config["calibration"] = {"max_length": 64, "batch_size": 4}
    config["models"] = models
    return config


JOB_CHILD = """
import json, sys, torch
from merge_harness.run.experiment import load_experiment
from merge_harness.run.runner import run_experiment
from merge_harness.store.database import ResultStore
torch.set_num_threads(1)
experiment = load_experiment(sys.argv[1])
with ResultStore(experiment.store) as store:
    summary = run_experiment(experiment, store, show_progress=False)
    assert not summary.failed, summary.failed
    row = store.results_frame(experiment.name).iloc[0]
print(json.dumps({"merge_s": row["time_build"] + row["time_evaluate"], "build_s": row["time_build"],
                  "evaluate_s": row["time_evaluate"], "peak_rss_mb": row["peak_rss_mb"]}))
"""


def run_job(zoo: dict[str, Path], out: Path) -> dict:
    """A `run` job as users run it: task arithmetic merged in memory, then lm-eval on 2 rows of
    toy_math (16 generated tokens); its peak RSS as `run` records it (VmHWM reset per job)."""
    out.mkdir(parents=True, exist_ok=True)
    finetunes = "".join(f"  ft{i}: {{model: {zoo[f'ft{i}']}, task: toy_math}}\n" for i in range(3))
    path = out / "job.yaml"
    path.write_text(
        f"name: memory-model-job\nbase_model: {zoo['base']}\nbaselines: false\nfinetunes:\n{finetunes}"
        "methods:\n  - method: task_arithmetic\n    parameters: {lambda: 1.0}\ntasks: [toy_math]\n"
        "evaluation: {limit: 2, apply_chat_template: true, gen_kwargs: {max_gen_toks: 16}}\n"
        f"store: {out / 'store.sqlite'}\n"
    )
    done = subprocess.run([sys.executable, "-c", JOB_CHILD, str(path)], capture_output=True, text=True,
                          timeout=3600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def parameter_count(name: str) -> int:
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**SHAPES[name]))
    return sum(p.numel() for p in model.parameters())  # tied: the embedding counted once


def fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """(intercept, slope) of the least-squares line through (xs, ys)."""
    slope, intercept = np.polyfit(np.asarray(xs, dtype=float), np.asarray(ys, dtype=float), 1)
    return float(intercept), float(slope)


def test_memory_and_time_model(benchmark, tmp_path):
    sizes = {name: parameter_count(name) for name in SHAPES}
    rows = []
    for dtype in DTYPES:
        for name in SHAPES:
            zoo = write_shape(name, dtype)
            for method in (*METHODS, JOB):
                where = tmp_path / f"{name}-{dtype}-{method.split()[0]}"
                if method == JOB:
                    result = run_job(zoo, where)
                else:
                    result = run_merge_child(merge_config(method, zoo, dtype), where, threads=1)
                itemsize = torch.empty((), dtype=getattr(torch, dtype)).element_size()
                rows.append({"shape": name, "dtype": dtype, "method": method, "params": sizes[name],
                             "model_mb": sizes[name] * itemsize / 1e6, **result})
                print(json.dumps(rows[-1]), flush=True)
    fits, predictions = {}, {}
    for dtype in DTYPES:
        for method in (*METHODS, JOB):
            chosen = [r for r in rows if r["dtype"] == dtype and r["method"] == method]
            memory = fit([r["model_mb"] for r in chosen], [r["peak_rss_mb"] for r in chosen])
            seconds = fit([r["params"] for r in chosen], [r["merge_s"] for r in chosen])
            itemsize = chosen[0]["model_mb"] * 1e6 / chosen[0]["params"]
            fits[f"{method} {dtype}"] = {"rss_mb": memory, "seconds": seconds}
            predictions[f"{method} {dtype}"] = {
                target: {"peak_rss_gb": (memory[0] + memory[1] * params * itemsize / 1e6) / 1e3,
                         "seconds": seconds[0] + seconds[1] * params}
                for target, params in TARGETS.items()
            }
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"rows": rows, "fits": fits, "predictions": predictions,
                                   "load_1min_end": os.getloadavg()[0]}, indent=2) + "\n")
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    for row in rows:  # the streaming methods never hold more than a few tensors per input
        if row["method"] == "task_arithmetic":
            assert row["peak_rss_mb"] - row["rss_after_import_mb"] < 2 * row["model_mb"] + 100, row
