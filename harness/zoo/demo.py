"""The offline demo: a model zoo -> every registered merge method -> lm-eval -> the full report.

`merge-harness demo` builds (or reuses) a zoo of one base model and one fine-tune per task,
merges the fine-tunes with every registered method (SLTA at model, layer and attn/MLP
granularity included), evaluates every model with lm-eval on the zoo's tasks, stores the results
and writes the tables, plots and leaderboard. Everything is cached: a second run reuses the
zoo and every finished job, and only re-renders the report.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from merge_harness.core.errors import ConfigError, JobsFailed
from merge_harness.merge.methods import method_registry
from merge_harness.run.driver import RunSummary
from merge_harness.run.experiment import Experiment, MethodRun

# Parameters for the demo's merges; methods not listed run with their defaults if they validate.
DEMO_METHODS: list[dict[str, Any]] = [
    {"method": "linear"},
    {"method": "task_arithmetic", "grid": {"lambda": [0.5, 1.0]}},
    # lambda chosen on held-out train rows (never on test), as the papers' baselines do
    {"method": "task_arithmetic", "label": "task_arithmetic (held-out lambda)", "search": {}},
    {"method": "ties", "parameters": {"density": 0.5}},
    {"method": "dare_linear", "parameters": {"density": 0.5}},
    {"method": "dare_ties", "parameters": {"density": 0.5}},
    {"method": "breadcrumbs", "parameters": {"density": 0.5, "gamma": 0.05}},
    {"method": "breadcrumbs_ties", "parameters": {"density": 0.5, "gamma": 0.05}},
    {"method": "della", "parameters": {"density": 0.5, "epsilon": 0.1}},
    {"method": "della_linear", "parameters": {"density": 0.5, "epsilon": 0.1}},
    {"method": "model_stock"},
    {"method": "regmean"},
    {"method": "fisher"},
    {"method": "slta", "label": "SLTA (model)", "parameters": {"granularity": "model"}},
    {"method": "slta", "label": "SLTA (layer)", "parameters": {"granularity": "layer"}},
    {"method": "slta", "label": "SLTA (attn/MLP)", "parameters": {"granularity": "attn_mlp"}},
    {"method": "multislerp", "parameters": {"weight": 1.0}},
    {"method": "karcher"},
    {"method": "sce"},
    {"method": "ram"},
    {"method": "ramplus_tl"},
]
# Methods of one or two models take the first fine-tune(s) ({first}, {second}: their names).
PAIRWISE: list[dict[str, Any]] = [
    # SLERP interpolates two models: the base and the first fine-tune, halfway.
    {"method": "slerp", "label": "slerp (base-{first}, t=0.5)", "parameters": {"t": 0.5}, "finetunes": 1},
    {"method": "nuslerp", "label": "nuslerp ({first}+{second})", "parameters": {"weight": 0.5},
     "finetunes": 2},
    {"method": "nearswap", "label": "nearswap (base-{first}, t=0.05)", "parameters": {"t": 0.05},
     "finetunes": 1},
    {"method": "arcee_fusion", "label": "arcee_fusion (base-{first})", "finetunes": 1},
    {"method": "passthrough", "label": "passthrough ({first})", "finetunes": 1},
]


@dataclass
class DemoResult:
    out: Path
    store: Path
    files: list[Path]
    experiment: str
    summary: RunSummary


def demo_methods(finetunes: list[str]) -> list[MethodRun]:
    """Every registered method: the demo's settings for built-ins, defaults for plugins."""
    runs = [MethodRun.model_validate(spec) for spec in DEMO_METHODS]
    names = {"first": finetunes[0], "second": finetunes[1 % len(finetunes)]}
    for spec in PAIRWISE:
        chosen = list(dict.fromkeys(finetunes[: spec["finetunes"]]))
        label = spec["label"].format(**names)
        runs.append(MethodRun.model_validate({**spec, "label": label, "finetunes": chosen}))
    covered = {run.method for run in runs}
    runs += [MethodRun(method=name) for name in method_registry() if name not in covered]
    return runs


HELD_OUT_ROWS = 64  # per task, for the held-out lambda search


def demo_experiment(
    zoo, name: str = "demo", limit: int | None = None, held_out: dict[str, Path] | None = None
) -> Experiment:
    """Every method on the zoo; calibration in the template the fine-tunes were trained with.

    `held_out`: task -> rows the fine-tunes never saw, for the held-out search (default: a held-out
    part of each train file).
    """
    finetunes = {
        task: {
            "model": str(path),
            "task": zoo.tasks[task],
            "calibration": {"source": str(zoo.train_data[task]), "template": zoo.template},
            **({"held_out": str(held_out[task])} if held_out else {}),
        }
        for task, path in zoo.finetunes.items()
    }
    return Experiment.model_validate(
        {
            "name": name,
            "base_model": str(zoo.base),
            "finetunes": finetunes,
            "methods": [run.model_dump(exclude_defaults=True) for run in demo_methods(list(finetunes))],
            "tasks": list(zoo.tasks.values()),
            # per-sample logs: the report's paired test of each merge against task arithmetic
            "evaluation": {"apply_chat_template": True, "batch_size": 64, "limit": limit,
                           "log_samples": True},
        }
    )


def build_demo_zoo(kind: str, root: Path, size: str, show_progress: bool):
    from merge_harness.zoo.zoos import build_smollm2_zoo, build_zoo

    if kind == "toy":
        return build_zoo(root, size=size, show_progress=show_progress)
    if kind == "smollm2":
        return build_smollm2_zoo(root, show_progress=show_progress)
    raise ConfigError(f"--zoo: unknown zoo {kind!r} (known: toy, smollm2)")


ZOO_CACHE = Path.home() / ".cache" / "merge-harness" / "zoo"


def zoo_threads(zoo_kind: str, requested: int | None) -> int | None:
    """torch threads for work on a zoo: as asked, else one for the toy zoo (its tiny models run
    several times faster on one thread than on two) and torch's own choice otherwise."""
    if requested is not None:
        return requested
    return 1 if zoo_kind == "toy" else None


def run_demo(
    out: Path,
    zoo_kind: str = "toy",
    size: str = "toy",
    show_progress: bool = True,
    zoo_root: Path = ZOO_CACHE,
    limit: int | None = None,
    threads: int | None = None,
) -> DemoResult:
    """Build/reuse the zoo, run every method, evaluate, and write the report under `out`.

    `threads`: torch CPU threads (default: `zoo_threads`).
    """
    from merge_harness.core.progress import console as progress_console
    from merge_harness.core.third_party import log_file_beside, third_party_output_to
    from merge_harness.io.models import torch_threads
    from merge_harness.reports.commands import write_report
    from merge_harness.run.runner import run_experiment
    from merge_harness.store.database import ResultStore
    from merge_harness.zoo.zoos import held_out_pairs, write_pairs

    out = Path(out)
    store_path = out / "results.sqlite"
    with third_party_output_to(log_file_beside(store_path), keep=[progress_console]):  # training's output too
        zoo = build_demo_zoo(zoo_kind, zoo_root, size, show_progress)
    name = f"demo-{zoo_kind}" + ("" if size == "toy" else f"-{size}") + (f"-limit{limit}" if limit else "")
    held_out = write_pairs(out / "held_out", held_out_pairs(zoo, HELD_OUT_ROWS), "held_out")
    experiment = demo_experiment(zoo, name=name, limit=limit, held_out=held_out)
    with ResultStore(store_path) as store, torch_threads(zoo_threads(zoo_kind, threads)):
        summary = run_experiment(experiment, store, show_progress=show_progress)
        if summary.failed:
            label, task, error = summary.failed[0]
            raise JobsFailed(f"demo: {len(summary.failed)} job(s) failed, first {label} / {task}: {error}")
        files = write_report(store, experiment.name, out / "report", "all")
    return DemoResult(out, store_path, files, experiment.name, summary)
