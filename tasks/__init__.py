"""lm-eval task definitions: one folder per task, a YAML per variant plus a small `utils.py`.

`merge_harness.evaluate.evaluator` registers this folder with lm-eval (`TaskManager(include_path=
TASKS_DIR)`). Every custom task has a `<name>_fixture` variant that `include:`s the real YAML and
swaps only the data for a small JSONL file in the real schema under `fixtures/`, so it runs
offline.

Each task declares its **primary metric** once, in its YAML (`metadata.primary_metric`, inherited
through `include:`): the number tables, the `run` summary and checks report for it.
lm-eval's own tasks, whose YAMLs are not ours, are declared in `LM_EVAL_PRIMARY_METRICS`.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cache
from pathlib import Path

import yaml

TASKS_DIR = Path(__file__).parent
# lm-eval's built-in tasks (by name prefix): their YAMLs live in lm-eval, so they are declared here.
LM_EVAL_PRIMARY_METRICS = {
    "gsm8k": "exact_match,strict-match",
    "winogrande": "acc",
    "humaneval": "pass@1",
}


class _TaskYamlLoader(yaml.SafeLoader):
    """Reads our task YAMLs without running them: `!function x` tags become None."""


_TaskYamlLoader.add_multi_constructor("!", lambda loader, suffix, node: None)


def _read(path: Path) -> dict:
    data = yaml.load(path.read_text(encoding="utf-8"), Loader=_TaskYamlLoader)  # noqa: S506 - safe loader
    return data if isinstance(data, dict) else {}


def _declared(path: Path, seen: frozenset[Path] = frozenset()) -> str | None:
    config = _read(path)
    metadata = config.get("metadata")
    if isinstance(metadata, dict) and isinstance(metadata.get("primary_metric"), str):
        return metadata["primary_metric"]
    include = config.get("include")
    parent = (path.parent / include).resolve() if isinstance(include, str) else None
    if parent is None or parent in seen or not parent.is_file():
        return None
    return _declared(parent, seen | {path.resolve()})


@cache
def task_files(tasks_dir: Path = TASKS_DIR) -> dict[str, Path]:
    """{task name: its YAML} for every task defined under `tasks_dir` (read once)."""
    found = {}
    for path in sorted(tasks_dir.rglob("*.yaml")):
        name = _read(path).get("task")
        if isinstance(name, str):
            found[name] = path
    return found


@cache
def declared_primary_metrics() -> dict[str, str]:
    """{task name: primary metric} for every task YAML of this folder that declares one."""
    declared = {name: _declared(path) for name, path in task_files().items()}
    return {name: metric for name, metric in declared.items() if metric}


def primary_metric(task: str) -> str | None:
    """The task's declared primary metric (ours from the YAML; lm-eval's by name prefix), else None."""
    declared = declared_primary_metrics()
    if task in declared:
        return declared[task]
    return by_name_prefix(task, LM_EVAL_PRIMARY_METRICS)


def by_name_prefix(task: str, table: Mapping[str, str]) -> str | None:
    """The value of the longest key of `table` that is `task` or a prefix of it before a "_"
    (`gsm8k` for gsm8k_fixture): how variants of a task inherit what is said of it."""
    matches = [p for p in table if task == p or task.startswith(p + "_")]
    return table[max(matches, key=len)] if matches else None
