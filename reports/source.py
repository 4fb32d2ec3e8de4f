"""What the reports read from a result store beyond `results_frame`: experiments and versions.

`ResultStore` has no reader for the experiments table or the versions of a job, so this module
opens the same SQLite file read-only (WAL lets it read while a run writes). Errors name the store
path and the experiments it holds.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from merge_harness.core.errors import ConfigError, StoreError
from merge_harness.store.database import ResultStore


def _query(store: ResultStore, sql: str, params: tuple = ()) -> list[tuple]:
    uri = f"{Path(store.path).resolve().as_uri()}?mode=ro"
    try:
        conn = sqlite3.connect(uri, uri=True, timeout=store.timeout_s)
        try:
            return conn.execute(sql, params).fetchall()
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise StoreError(f"{store.path}: cannot read it for a report ({exc})") from exc


def experiment_names(store: ResultStore, *, with_results: bool = False) -> list[str]:
    """Experiments in the store (only those with a finished job if `with_results`), sorted."""
    sql = "SELECT name FROM experiments"
    if with_results:
        sql = ("SELECT DISTINCT l.experiment FROM experiment_jobs l JOIN jobs j ON "
               "j.key = l.job_key WHERE j.status = 'done'")
    return sorted(name for (name,) in _query(store, sql))


def experiment_config(store: ResultStore, name: str) -> dict[str, Any]:
    """The experiment's config as `ensure_experiment` stored it ({} if it was never saved)."""
    rows = _query(store, "SELECT config_json FROM experiments WHERE name = ?", (name,))
    return json.loads(rows[0][0]) if rows and rows[0][0] else {}


def finetune_tasks(config: Mapping[str, Any]) -> dict[str, str]:
    """{fine-tune name: the task it was tuned for} from an Experiment config (those with a task)."""
    finetunes = config.get("finetunes") or {}
    return {name: ft["task"] for name, ft in finetunes.items()
            if isinstance(ft, Mapping) and isinstance(ft.get("task"), str)}


def oracle_labels(config: Mapping[str, Any]) -> list[str]:
    """Labels of the experiment's `oracle: true` grids (their rows: LABEL or "LABEL (...)")."""
    return [str(run.get("label") or run.get("method")) for run in config.get("methods") or ()
            if isinstance(run, Mapping) and run.get("oracle")]


def model_family(config: Mapping[str, Any], experiment: str) -> str:
    """A short name for the base model ('Llama-2-7b-hf' for meta-llama/Llama-2-7b-hf)."""
    base = config.get("base_model")
    return Path(str(base).rstrip("/")).name if base else experiment


def resolve_experiments(store: ResultStore, experiment: str | None) -> list[str]:
    """[experiment] if it has results, or every experiment with results when None; else an error."""
    known = experiment_names(store, with_results=True)
    if not known:
        everything = experiment_names(store)
        held = f" (experiments without finished jobs: {everything})" if everything else ""
        raise StoreError(f"the result store {store.path} holds no finished results{held}; run "
                         "`merge-harness run EXPERIMENT.yaml` first or pass the right store path")
    if experiment is None:
        return known
    if experiment not in known:
        state = ("has no finished jobs yet" if experiment in experiment_names(store)
                 else "is not in it")
        raise ConfigError(f"experiment {experiment!r} {state} (result store {store.path}); "
                          f"experiments with results: {', '.join(known)}")
    return [experiment]


def job_versions(store: ResultStore, keys: Iterable[str]) -> dict[str, dict[str, str]]:
    """{job key: {package: version}} for the given jobs (lm_eval, task versions, torch...)."""
    wanted = set(keys)
    out: dict[str, dict[str, str]] = {}
    for key, package, version in _query(store, "SELECT job_key, package, version FROM versions "
                                               "ORDER BY job_key, package"):
        if key in wanted:
            out.setdefault(key, {})[package] = version
    return out


def coefficients_for(store: ResultStore, results: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """{row label: its solved coefficients} for the merges of `results` that have any."""
    out: dict[str, pd.DataFrame] = {}
    for label, rows in results.groupby("label", sort=True):
        coefficients = store.coefficients_frame(rows["key"].iloc[0])
        if not coefficients.empty:
            out[str(label)] = coefficients
    return out


def samples_by_label(store: ResultStore, results: pd.DataFrame) -> dict[str, list[dict]]:
    """Row label -> the per-sample logs of its jobs (rows without stored samples are left out)."""
    found: dict[str, list[dict]] = {}
    for label, key in results[["label", "key"]].drop_duplicates().itertuples(index=False):
        if samples := store.samples_log(str(key)):
            found.setdefault(str(label), []).extend(samples)
    return found
