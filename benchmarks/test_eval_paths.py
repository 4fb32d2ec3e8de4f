"""Evaluation-side costs: in-memory merge vs save-then-load, and re-running a finished experiment.

    .venv/bin/pytest benchmarks/test_eval_paths.py --benchmark-only -q -s

1. A merged 135M-shaped model (base + 3 fine-tunes, task arithmetic) reaches lm-eval either
   in memory (`merge_model`: the state dict is assigned into a meta-initialised model) or through
   disk (`merge_to_disk` + `from_pretrained`). Evaluation itself is the same for both, so the
   difference of these two build times is the time saved per merged model.
2. Re-running an experiment whose jobs are all in the store must only hash the models (cached by
   size and mtime) and look the keys up: target < 5 s.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import torch

from benchmarks.conftest import CACHE_DIR, ZOO_VERSION, build_zoo
from merge_harness.io.models import load_pretrained
from merge_harness.merge.config import MergeConfig
from merge_harness.merge.engine import merge_model, merge_to_disk

ROUNDS = 2


def merge_config(zoo: dict[str, Path]) -> MergeConfig:
    models = [{"model": str(zoo[f"ft{i}"]), "parameters": {"weight": 0.3}} for i in range(3)]
    return MergeConfig.model_validate(
        {"method": "task_arithmetic", "base_model": str(zoo["base"]), "models": models}
    )


def in_memory(config: MergeConfig) -> float:
    start = time.perf_counter()
    model, _ = merge_model(config)
    seconds = time.perf_counter() - start
    del model
    return seconds


def through_disk(config: MergeConfig, out: Path) -> float:
    start = time.perf_counter()
    merge_to_disk(config, out, force=True, show_progress=False)
    model = load_pretrained(out)
    seconds = time.perf_counter() - start
    del model
    shutil.rmtree(out)
    return seconds


def test_in_memory_merge_vs_save_then_load(benchmark, tmp_path):
    config = merge_config(build_zoo(CACHE_DIR / ZOO_VERSION))
    memory, disk = [], []
    for _ in range(ROUNDS):  # interleaved, so machine load hits both alike
        memory.append(in_memory(config))
        disk.append(through_disk(config, tmp_path / "merged"))
    benchmark.extra_info.update(
        in_memory_s=min(memory), save_then_load_s=min(disk), saved_per_model_s=min(disk) - min(memory)
    )
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    print(
        f"\nin memory {min(memory):.2f} s, save+load {min(disk):.2f} s, saved {min(disk) - min(memory):.2f} s"
    )
    assert min(memory) > 0 and min(disk) > 0


def tiny_experiment(root: Path) -> Path:
    from merge_harness.zoo.toymodel import tiny_llama, train_tokenizer

    tokenizer = train_tokenizer([f"{a} plus {b} is {a + b}" for a in range(20) for b in range(20)], 300)
    for name, noise in (("base", 0.0), ("math", 0.05), ("qa", 0.05)):
        model = tiny_llama(tokenizer, hidden_size=32, layers=2, intermediate=64)
        with torch.no_grad():
            for param in model.parameters():
                param.add_(noise * torch.randn_like(param))
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    path = root / "experiment.yaml"
    path.write_text(
        f"name: cached-rerun\nbase_model: {root / 'base'}\n"
        f"finetunes:\n  math: {{model: {root / 'math'}}}\n  qa: {{model: {root / 'qa'}}}\n"
        "methods:\n  - method: task_arithmetic\n    grid: {lambda: [0.3, 0.5, 1.0]}\n"
        "  - method: ties\n    parameters: {density: 0.5}\n"
        "tasks: [gsm8k_fixture, cosmos_qa_fixture]\n"
        "evaluation: {limit: 2, gen_kwargs: {max_gen_toks: 4}}\n"
    )
    return path


@pytest.mark.benchmark(group="cached-rerun")
def test_rerun_of_a_finished_experiment(benchmark, tmp_path):
    from merge_harness.run.experiment import load_experiment
    from merge_harness.run.runner import run_experiment
    from merge_harness.store.database import ResultStore

    experiment = load_experiment(tiny_experiment(tmp_path))
    with ResultStore(tmp_path / "store.sqlite") as store:
        first = run_experiment(experiment, store, show_progress=False)
        assert first.computed == first.total == 14
        rerun = benchmark.pedantic(
            lambda: run_experiment(experiment, store, show_progress=False), rounds=3, iterations=1
        )
    assert rerun.computed == 0 and rerun.reused == 14
