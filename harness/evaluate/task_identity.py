"""What identifies a task's definition in a job key: its declared version and a hash of its config.

lm-eval's recorded version of a task (`metadata.version`) is bumped by hand and often is not;
the key therefore also holds a hash of the task's config as lm-eval will load it (its YAML with
`include:`s resolved) and of the source of the local modules its `!function`s name (a task's
`utils.py`). It is read from the YAML without importing anything or loading any data, so
planning stays cheap; it is computed once per task and recomputed only when a file in the task's
folder changes (size or mtime). Paths are made relative to the task root, so the same tasks in
another checkout give the same keys.
Not covered: the data set's content (HF data sets are named by path; fixture JSONL files by name)
and the members of a group (a group's own config only).
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Any

from merge_harness.evaluate.evaluator import TaskCatalog, config_hash


def task_identity(name: str, catalog: TaskCatalog) -> dict[str, Any]:
    """{"version": the task's metadata.version, "config": sha256 prefix of its config + code}."""
    entry = catalog.manager.task_index.get(name)
    if entry is None or entry.yaml_path is None:
        config = dict(entry.cfg or {}) if entry is not None else {}
        return {"version": _version(config), "config": config_hash(config)}
    path = Path(entry.yaml_path).resolve()
    return _yaml_identity(path, _roots(catalog), _folder_signature(path.parent))


def _roots(catalog: TaskCatalog) -> tuple[Path, ...]:
    import lm_eval.tasks

    return (*(p.resolve() for p in catalog.include_paths), Path(lm_eval.tasks.__file__).parent.resolve())


def _folder_signature(folder: Path) -> tuple[tuple[str, int, int], ...]:
    """(name, size, mtime) of the YAML and Python files next to a task: its includes and utils."""
    files = sorted(p for p in folder.iterdir() if p.suffix in {".yaml", ".yml", ".py"})
    return tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files)


@functools.lru_cache(maxsize=4096)
def _yaml_identity(path: Path, roots: tuple[Path, ...], signature: tuple) -> dict[str, Any]:
    from lm_eval.tasks._yaml_loader import load_yaml

    config = load_yaml(path, resolve_func=False)  # `!function f` -> "<yaml dir>/f" (a string)
    sources: dict[str, str] = {}
    portable = _portable(config, roots, sources)
    return {"version": _version(config), "config": config_hash({**portable, "sources": sources})}


def _portable(value: Any, roots: tuple[Path, ...], sources: dict[str, str]) -> Any:
    """The config with absolute task paths made relative to their root; local module sources
    hashed into `sources` (relative module path -> sha256)."""
    if isinstance(value, dict):
        return {k: _portable(v, roots, sources) for k, v in value.items()}
    if isinstance(value, list):
        return [_portable(v, roots, sources) for v in value]
    if not isinstance(value, str) or not value.startswith("/"):
        return value
    for root in roots:
        if value.startswith(f"{root}/"):
            relative = value[len(str(root)) + 1 :]
            module = Path(value.rpartition(".")[0] + ".py")
            if module.is_file():
                sources[relative.rpartition(".")[0]] = hashlib.sha256(module.read_bytes()).hexdigest()
            return relative
    return value


def _version(config: dict[str, Any]) -> str | None:
    metadata = config.get("metadata")
    version = metadata.get("version") if isinstance(metadata, dict) else None
    return None if version is None else str(version)
