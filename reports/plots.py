"""Figures (matplotlib, Agg, no pyplot state): per-task bars by method, SLTA coefficients per
submodule and task, and score against a swept hyper-parameter. Each function returns a Figure;
`save` writes it as PNG and SVG, `svg_data_uri` embeds it in the HTML leaderboard.
"""

from __future__ import annotations

import base64
import io
import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import rcParams
from matplotlib.figure import Figure

from merge_harness.core.atomic import atomic_write_bytes
from merge_harness.reports import metrics as m
from merge_harness.reports.frame import AVERAGE, ComparisonTable, spec_params

rcParams["svg.fonttype"] = "none"  # text stays text: small, searchable SVGs
rcParams["svg.hashsalt"] = "merge-harness"  # stable ids, so the SVGs are reproducible
_SUBMODULE = re.compile(r"^layers\.(\d+)(?:\.(.+))?$")


def task_bars(table: ComparisonTable) -> Figure:
    """Grouped bars: one group per task (and the average), one bar per row of the table."""
    score = table.blocks[0].values
    columns = [c.title for c in table.columns] + [AVERAGE]
    rows = list(table.rows.index)
    fig = Figure(figsize=(max(6.5, 1.4 * len(columns) + 0.2 * len(rows)), 4.8), dpi=100)
    ax = fig.add_subplot()
    width = 0.8 / max(len(rows), 1)
    colours = _colours(len(rows))
    for i, row in enumerate(rows):
        heights = score.loc[row, columns].to_numpy(dtype=float)
        x = np.arange(len(columns)) + (i - (len(rows) - 1) / 2) * width
        ax.bar(x, np.nan_to_num(heights), width, label=table.rows.at[row, "title"], color=colours[i])
    ax.set_xticks(np.arange(len(columns)), [c.replace(" (", "\n(") for c in columns], fontsize=8)
    ax.set_ylabel("score (points)")
    ax.set_title(f"{table.experiment}: score per task")
    ax.legend(fontsize=7, ncols=3, loc="upper center", bbox_to_anchor=(0.5, -0.14), frameon=False)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def _colours(count: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab20" if count > 10 else "tab10"]
    return [cmap(i % cmap.N) for i in range(count)]


def submodule_order(name: str) -> tuple:
    """layers.2 < layers.2.self_attn < layers.2.mlp < layers.10 < anything that is not a layer."""
    match = _SUBMODULE.match(name)
    if not match:
        return (1, 0, 0, name)
    part = match.group(2) or ""
    rank = 0 if not part else 1 if "attn" in part else 2 if "mlp" in part else 3
    return (0, int(match.group(1)), rank, part)


def coefficient_heatmap(coefficients: pd.DataFrame, title: str) -> Figure:
    """SLTA's solved a_t: rows = submodules in layer order, columns = tasks (coefficients_frame)."""
    grid = coefficients.pivot_table(index="submodule", columns="task", values="value", aggfunc="first")
    grid = grid.loc[sorted(grid.index, key=submodule_order)]
    fig = Figure(figsize=(1.6 + 1.1 * grid.shape[1], 1.4 + 0.28 * grid.shape[0]), dpi=100)
    ax = fig.add_subplot()
    image = ax.imshow(grid.to_numpy(dtype=float), aspect="auto", cmap="viridis")
    ax.set_xticks(range(grid.shape[1]), list(grid.columns), fontsize=8, rotation=30, ha="right")
    ax.set_yticks(range(grid.shape[0]), list(grid.index), fontsize=7)
    if grid.size <= 240:
        mid = float(np.nanmean(grid.to_numpy(dtype=float)))
        for (i, j), value in np.ndenumerate(grid.to_numpy(dtype=float)):
            if not math.isnan(value):
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=6,
                        color="black" if value > mid else "white")
    fig.colorbar(image, ax=ax, label="coefficient a_t")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def sweeps(results: pd.DataFrame) -> list[tuple[str, str]]:
    """(method, parameter) pairs where a method's merges take 2+ numeric values of a parameter."""
    found = []
    merges = results[results["method"].notna()].drop_duplicates("label")
    for method, rows in merges.groupby("method"):
        params = [spec_params(_spec(s)) for s in rows["spec_json"]]
        for name in sorted({k for p in params for k in p}):
            values = {p.get(name) for p in params}
            if len(values) > 1 and all(isinstance(v, (int, float)) for v in values):
                found.append((str(method), name))
    return found


def _spec(spec_json: str) -> dict:
    return json.loads(spec_json)


def sweep_plot(results: pd.DataFrame, method: str, parameter: str) -> Figure:
    """Score (points, primary metric) against `parameter` for `method`'s merges, one line per task."""
    rows = results[results["method"] == method].copy()
    rows["x"] = [spec_params(_spec(s)).get(parameter) for s in rows["spec_json"]]
    fig = Figure(figsize=(5.0, 3.4), dpi=100)
    ax = fig.add_subplot()
    for task, group in rows.groupby("task"):
        metric = m.primary_metric(str(task), group["metric"].unique())
        picked = group[group["metric"] == metric].sort_values("x")
        ax.plot(picked["x"], picked["value"] * m.points_per_unit(metric), marker="o",
                label=f"{m.task_title(str(task))} ({metric})")
    ax.set_xlabel(parameter)
    ax.set_ylabel("score (points)")
    ax.set_title(f"{m.METHOD_TITLES.get(method, method)}: score vs {parameter}", fontsize=9)
    ax.legend(fontsize=7, frameon=False)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def figure_bytes(fig: Figure, fmt: str) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format=fmt, metadata={"Date": None} if fmt == "svg" else None)
    return buffer.getvalue()


def save(fig: Figure, stem: Path) -> tuple[list[Path], bytes]:
    """Write `stem`.png and `stem`.svg (atomically); returns both paths and the SVG bytes."""
    svg = figure_bytes(fig, "svg")
    png_path, svg_path = stem.with_name(f"{stem.name}.png"), stem.with_name(f"{stem.name}.svg")
    atomic_write_bytes(png_path, figure_bytes(fig, "png"))
    atomic_write_bytes(svg_path, svg)
    return [png_path, svg_path], svg


def svg_data_uri(svg: bytes | Figure) -> str:
    """An SVG (or a figure) as a data: URI: an <img> of it needs no file and shares no SVG ids."""
    data = figure_bytes(svg, "svg") if isinstance(svg, Figure) else svg
    return "data:image/svg+xml;base64," + base64.b64encode(data).decode("ascii")
