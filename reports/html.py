"""HTML: the leaderboard, one static self-contained page (inline CSS and JS, figures as data:
URIs, a Content-Security-Policy that forbids any network fetch), so it opens offline from disk.

Rows = the rows of one or more experiments' comparison tables; columns = tasks (primary metric,
points), averages, costs. Click a header to sort; filter by task, method, model family or text;
click a row's toggle to see its jobs (keys, metrics with stderr, timings, versions, job spec).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from jinja2 import Environment, FileSystemLoader, StrictUndefined

from merge_harness.reports.frame import AVERAGE, COST_COLUMNS, ComparisonTable

TEMPLATES = Path(__file__).parent / "templates"


@dataclass(frozen=True)
class LeaderColumn:
    key: str  # unique id used by the page's script
    title: str
    block: str  # which block of the table the numbers come from
    source: str  # that block's column title
    task: str | None = None  # set for task columns (the task filter shows only one)
    lower_is_better: bool = False


def _columns(tables: Sequence[ComparisonTable]) -> list[LeaderColumn]:
    tasks: dict[str, LeaderColumn] = {}
    for table in tables:
        for column in table.columns:
            tasks.setdefault(column.title, LeaderColumn(
                f"task-{len(tasks)}", column.title, "score", column.title, task=column.title,
                lower_is_better=column.title in table.blocks[0].lower_is_better))
    extra = [LeaderColumn("avg", AVERAGE, "score", AVERAGE)]
    if any(t.block("normalized") for t in tables):
        extra.append(LeaderColumn("norm", "Norm. avg. (%)", "normalized", AVERAGE))
    if any(t.block("delta") for t in tables):
        extra.append(LeaderColumn("delta", "Δ TA avg.", "delta", AVERAGE))
    for i, cost in enumerate(COST_COLUMNS):
        if any(cost in t.blocks[0].values.columns for t in tables):
            extra.append(LeaderColumn(f"cost-{i}", cost, "score", cost, lower_is_better=True))
    return [*tasks.values(), *extra]


def _cell(table: ComparisonTable, row: str, column: LeaderColumn) -> dict[str, Any]:
    block = table.block(column.block)
    if block is None or column.source not in block.values.columns:
        return {"text": "–", "value": "", "best": False, "lowest": False}
    value = block.values.at[row, column.source]
    missing = value is None or (isinstance(value, float) and math.isnan(value))
    cell = block.cell(row, column.source)
    return {"text": cell.text + cell.mark, "value": "" if missing else f"{value:.6g}",
            "best": cell.best, "lowest": cell.lowest}


def _ranks(table: ComparisonTable) -> dict[str, int]:
    merges = table.rows.index[table.rows["kind"] == "merge"]
    averages = table.blocks[0].values.loc[merges, AVERAGE].dropna().sort_values(ascending=False)
    return {row: rank for rank, row in enumerate(averages.index, start=1)}


def job_details(results: pd.DataFrame, versions: Mapping[str, Mapping[str, str]] | None = None
                ) -> dict[str, dict[str, Any]]:
    """{row label: {"spec": job spec JSON, "jobs": [per task: key, metrics, timings, versions]}}."""
    versions = versions or {}
    details: dict[str, dict[str, Any]] = {}
    time_columns = [c for c in results.columns if c.startswith("time_")]
    for (label, key), rows in results.groupby(["label", "key"], sort=True):
        first = rows.iloc[0]
        spec = json.loads(first["spec_json"])
        entry = details.setdefault(str(label), {"spec": "", "jobs": []})
        entry["spec"] = entry["spec"] or json.dumps({k: v for k, v in spec.items() if k != "task"},
                                                    indent=2, sort_keys=True)
        entry["jobs"].append({
            "task": first["task"], "key": key,
            "metrics": [{"metric": r.metric, "value": f"{r.value:.6g}",
                         "stderr": "" if pd.isna(r.stderr) else f"{r.stderr:.3g}",
                         "samples": "" if pd.isna(r.samples) else int(r.samples)}
                        for r in rows.itertuples()],
            "timings": {c.removeprefix("time_"): f"{first[c]:.2f} s" for c in time_columns
                        if not pd.isna(first[c])},
            "peak_rss_mb": "" if pd.isna(first["peak_rss_mb"]) else f"{first['peak_rss_mb']:.0f}",
            "versions": {**spec.get("versions", {}), **versions.get(key, {})},
        })
    for entry in details.values():
        entry["jobs"].sort(key=lambda job: job["task"])
    return details


def leaderboard_context(tables: Sequence[ComparisonTable],
                        details: Mapping[tuple[str, str], dict[str, Any]] | None = None,
                        figures: Sequence[tuple[str, str]] = ()) -> dict[str, Any]:
    """What the template needs: columns, rows with cells and details, filter options, figures."""
    columns = _columns(tables)
    rows = []
    for table in tables:
        ranks = _ranks(table)
        for row, meta in table.rows.iterrows():
            method = meta["method"] if isinstance(meta["method"], str) else meta["kind"]
            rows.append({
                "experiment": table.experiment, "family": table.family, "title": meta["title"],
                "kind": meta["kind"], "method": method, "params": meta["params_text"],
                "rank": ranks.get(row, ""), "cells": [_cell(table, row, c) for c in columns],
                "detail": (details or {}).get((table.experiment, row)),
            })
    notes = [f"{t.experiment}: {note}" for t in tables for note in t.all_notes()]
    return {"columns": columns, "rows": rows, "figures": list(figures), "notes": notes,
            "tasks": [c.task for c in columns if c.task], "experiments": [t.experiment for t in tables],
            "methods": sorted({r["method"] for r in rows}), "families": sorted({r["family"] for r in rows})}


def render_html(tables: Sequence[ComparisonTable],
                details: Mapping[tuple[str, str], dict[str, Any]] | None = None,
                figures: Sequence[tuple[str, str]] = (), title: str = "merge-harness leaderboard") -> str:
    """The leaderboard page; `details` by (experiment, row label), `figures` as (caption, data URI)."""
    env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=True,
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    context = leaderboard_context(tables, details, figures)
    return env.get_template("leaderboard.html.j2").render(title=title, **context)
