"""GPU check: every merge method and the toy demo on CUDA, checked against the CPU; merge speed.

Run on a machine with a GPU (the `device` tool's lent H100/H200), from the repository root:

    python -m benchmarks.gpu_check --zoo ZOO_DIR --out "$OUT" [--cpu-table docs/results/demo_toy/table.csv]

ZOO_DIR is a built toy zoo (`merge-harness demo` caches it in ~/.cache/merge-harness/zoo). The
lent machines have no network: docs/scale_out.md says which wheels travel with the command.
`gpu_check.json` holds four sections:

- `methods`: every method of the demo merged on the CPU and on CUDA from the same checkpoints:
  the largest absolute difference of any merged tensor, and the seconds each took;
- `demo`: the demo experiment (merge in memory + lm-eval's HF backend) run on CUDA, its scores,
  and their difference from the CPU run's table (`--cpu-table`);
- `speed`: task arithmetic and TIES on a SmolLM2-135M-shaped random zoo (three fine-tunes),
  in memory, CPU (all cores) against CUDA, best of two runs each;
- `vllm`: the vLLM backend against HF on the task-arithmetic merge when vllm imports, else why not
  (`benchmarks/vllm_check.py` measures throughput and agreement on the SmolLM2 zoo, one engine).

`--device cpu` runs the same script without a GPU (a dry run: every difference is then 0).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from merge_harness.merge.engine import merge_state_dict
from merge_harness.run.experiment import method_configs
from merge_harness.zoo.demo import demo_experiment
from merge_harness.zoo.zoos import Zoo


def max_difference(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> float:
    """Largest |a - b| over every tensor of two state dicts with the same names."""
    if first.keys() != second.keys():
        raise ValueError(f"different tensors: {sorted(first.keys() ^ second.keys())[:3]}")
    return max(float((first[n].cpu().float() - second[n].cpu().float()).abs().max()) for n in first)


def timed_merge(config) -> tuple[dict[str, torch.Tensor], float]:
    if config.device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    state = merge_state_dict(config).state
    if config.device.startswith("cuda"):
        torch.cuda.synchronize()
    return state, time.perf_counter() - start


def check_methods(zoo: Zoo, device: str) -> list[dict]:
    """Every demo method merged on the CPU and on `device`, compared tensor by tensor."""
    rows = []
    for label, config in method_configs(demo_experiment(zoo)):
        on_cpu, cpu_seconds = timed_merge(config)
        on_device, device_seconds = timed_merge(config.model_copy(update={"device": device}))
        rows.append(
            {
                "method": label,
                "max_abs_diff": max_difference(on_cpu, on_device),
                "cpu_s": round(cpu_seconds, 3),
                f"{device}_s": round(device_seconds, 3),
            }
        )
        print(rows[-1], flush=True)
    return rows


def run_demo_on(zoo: Zoo, device: str, store_path: Path) -> pd.DataFrame:
    """The demo experiment with merges and lm-eval on `device`: its comparison table."""
    from merge_harness.reports.frame import comparison_frame
    from merge_harness.run.runner import run_experiment
    from merge_harness.store.database import ResultStore

    experiment = demo_experiment(zoo, name=f"demo-toy-{device}")
    evaluation = experiment.evaluation.model_copy(update={"device": device})
    experiment = experiment.model_copy(update={"device": device, "evaluation": evaluation})
    with ResultStore(store_path) as store:
        summary = run_experiment(experiment, store, show_progress=False)
        if summary.failed:
            raise RuntimeError(f"demo on {device}: {summary.failed[:2]}")
        return comparison_frame(store, experiment.name)


def compare_tables(measured: pd.DataFrame, reference_csv: Path | None) -> dict:
    """Per-task score differences between this run and the CPU table, for rows in both."""
    if reference_csv is None or not reference_csv.is_file():
        return {"reference": None}
    reference = pd.read_csv(reference_csv).set_index("model")
    columns = [c for c in measured.columns if c in reference.columns and c.startswith("toy_")]
    rows = [r for r in measured.index if r in reference.index]
    delta = measured.loc[rows, columns].astype(float) - reference.loc[rows, columns].astype(float)
    return {
        "reference": str(reference_csv),
        "rows_compared": len(rows),
        "max_abs_diff_points": float(delta.abs().max().max()),
        "cells_that_differ": int((delta.abs() > 1e-3).sum().sum()),  # the CSV keeps 6 digits
        "differences": {r: d for r, d in delta.round(4).to_dict(orient="index").items() if any(d.values())},
    }


def check_speed(device: str, root: Path) -> list[dict]:
    """Task arithmetic and TIES in memory on a 135M-shaped random zoo: CPU vs `device`."""
    from benchmarks.conftest import build_zoo
    from merge_harness.merge.config import MergeConfig

    zoo = build_zoo(root)
    rows = []
    for method, parameters in (("task_arithmetic", {"lambda": 0.5}), ("ties", {"density": 0.5})):
        data = {
            "method": method,
            "base_model": str(zoo["base"]),
            "models": [{"model": str(zoo[f"ft{i}"])} for i in range(3)],
            "parameters": parameters,
        }
        row = {"method": method, "cpu_threads": torch.get_num_threads()}
        for where in ("cpu", device):
            config = MergeConfig.model_validate({**data, "device": where})
            row[f"{where}_s"] = round(min(timed_merge(config)[1] for _ in range(2)), 3)
        rows.append(row)
        print(row, flush=True)
    return rows


def check_vllm(zoo: Zoo) -> dict:
    """vLLM vs HF on the task-arithmetic merge of the zoo, when vllm is installed."""
    try:
        import vllm  # noqa: F401
    except ImportError as exc:
        return {"ran": False, "why": f"vllm does not import here: {exc}"}
    from merge_harness.evaluate.evaluator import EvalSettings, evaluate
    from merge_harness.merge.engine import merge_model

    label, config = next(
        (lab, c) for lab, c in method_configs(demo_experiment(zoo)) if "task_arithmetic" in lab
    )
    model, tokenizer_dir = merge_model(config)
    tasks = list(zoo.tasks.values())
    record: dict = {"ran": True, "merge": label}
    for backend, device in (("hf", "cuda"), ("vllm", "cuda")):
        settings = EvalSettings(backend=backend, device=device, apply_chat_template=True, batch_size=64)
        start = time.perf_counter()
        report = evaluate(model, tokenizer_dir, tasks, settings)
        record[backend] = {
            "seconds": time.perf_counter() - start,
            "scores": {f"{s.task} {s.metric}": s.value for s in report.scores},
        }
    record["speedup_vllm_over_hf"] = record["hf"]["seconds"] / record["vllm"]["seconds"]
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", type=Path, required=True, help="a built toy zoo directory")
    parser.add_argument("--out", type=Path, default=Path("gpu-check"))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--cpu-table", type=Path, default=Path("docs/results/demo_toy/table.csv"))
    parser.add_argument("--speed-zoo", type=Path, help="where the 135M random zoo is (built if missing)")
    parser.add_argument("--skip", default="", help="comma-separated sections to skip")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    skip = set(filter(None, args.skip.split(",")))
    zoo = Zoo.at(args.zoo.resolve())
    record: dict = {
        "device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else platform.processor(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
    }

    def save() -> None:  # after every section, so a timeout keeps what finished
        (args.out / "gpu_check.json").write_text(json.dumps(record, indent=2, default=str) + "\n")

    if "methods" not in skip:
        record["methods"] = check_methods(zoo, args.device)
        save()
    if "demo" not in skip:
        start = time.perf_counter()
        table = run_demo_on(zoo, args.device, args.out / "demo_gpu.sqlite")
        record["demo"] = {
            "seconds": round(time.perf_counter() - start, 1),
            "table": table.to_dict(orient="index"),
            "vs_cpu": compare_tables(table, args.cpu_table),
        }
        table.to_csv(args.out / "demo_gpu_table.csv")
        save()
    if "speed" not in skip:
        root = args.speed_zoo or Path(tempfile.mkdtemp(prefix="zoo135m-"))
        record["speed"] = check_speed(args.device, root)
        save()
    if "vllm" not in skip:
        record["vllm"] = check_vllm(zoo)
        save()
    print(json.dumps({k: v for k, v in record.items() if k != "demo"}, indent=2, default=str))
    print(json.dumps(record.get("demo", {}).get("vs_cpu"), indent=2))


if __name__ == "__main__":
    main()
