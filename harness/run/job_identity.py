"""What determines a job's result, as the data its key is hashed from
(`merge_harness.store.database.content_key`).

Weights by the sha256 of their files (cached in the store by path, size and mtime), calibration
and held-out data by content, a data-driven merge's calibration recipe with its template
resolved, and settings as plain JSON. Anything that does not change the result (file paths and
mtimes, the order of YAML keys, a fine-tune's `finetune.json` record) stays out of the key.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from merge_harness.io.models import resolve_model
from merge_harness.merge.config import MergeConfig, ModelEntry
from merge_harness.store.database import ResultStore
from merge_harness.train.prompts import RECORD_FILE


def file_sha256(path: Path, store: ResultStore | None) -> str:
    stat = path.stat()
    if store is not None and (
        cached := store.cached_hash(str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    ):
        return cached
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(16 * 1024 * 1024):
            digest.update(chunk)
    if store is not None:
        store.save_hash(str(path.resolve()), stat.st_size, stat.st_mtime_ns, digest.hexdigest())
    return digest.hexdigest()


def model_identity(ref: str, store: ResultStore | None) -> dict[str, Any]:
    """What identifies a model's weights: the hashes of its weight and config files."""
    path = resolve_model(ref)
    files = sorted(p for p in path.iterdir() if p.suffix in {".safetensors", ".bin", ".json"})
    files = [p for p in files if p.name not in {"trainer_state.json", RECORD_FILE}]  # not weights
    return {"files": {p.name: file_sha256(p, store) for p in files}}


def calibration_identity(ref: str | None, store: ResultStore | None) -> str | None:
    if ref is None or not Path(ref).is_file():
        return ref  # a task name (its version is part of lm-eval's) or nothing
    return file_sha256(Path(ref), store)


def merge_identity(
    merge: MergeConfig,
    calibrated: bool,
    identity: Callable[[str], dict[str, Any]],
    where: dict[str, str],
    store: ResultStore | None,
    identify: bool = True,
) -> dict[str, Any]:
    """What determines a merge's weights. Data-driven methods add their calibration recipe (data
    hash, resolved template, N / seed overrides, settings); per-tensor methods never read it."""
    models = []
    for entry in merge.models:
        item = {"weights": identity(entry.model), "parameters": plain_settings(entry.parameters)}
        if calibrated and entry.calibration is not None:
            place = where.get(entry.model, "calibration")
            item["calibration"] = recipe_identity(merge, entry, place, store, identify)
        models.append(item)
    out = {
        "method": merge.method,
        "parameters": plain_settings(merge.parameters),
        "base": identity(merge.base_model),
        "models": models,
        "seed": merge.seed,
        "dtype": merge.output_dtype,
    }
    if calibrated:
        out["calibration"] = merge.calibration.model_dump(mode="json", exclude={"template"})
    return out


def recipe_identity(
    merge: MergeConfig, entry: ModelEntry, where: str, store: ResultStore | None, identify: bool
) -> dict:
    """One fine-tune's calibration: its data by content, and the template it resolves to.

    `identify` False (validating only, weights maybe not here): nothing is read, and a template
    left to the fine-tune's record stays "recorded".
    """
    from merge_harness.merge.calibration_data import resolve_template

    source = entry.calibration
    if not identify:
        template = source.template or merge.calibration.template or "recorded"
        return {**source.model_dump(mode="json"), "template": template}
    template = resolve_template(source, merge.calibration, resolve_model(entry.model), where)
    return {
        **source.model_dump(mode="json"),
        "source": calibration_identity(source.source, store),
        "template": template,
    }


def plain_settings(value: Any) -> Any:
    """Settings (pydantic conditions, nested lists) as plain JSON-able data."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json", exclude_none=True)
    if isinstance(value, dict):
        return {k: plain_settings(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain_settings(v) for v in value]
    return value
