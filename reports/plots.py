"""Figures (matplotlib, Agg, no pyplot state): a models x tasks heatmap of the comparison table,
SLTA coefficients per submodule and task, and score against a swept hyper-parameter. Each
function returns a Figure (constrained layout: no clipped title or label); `save` writes it as
PNG and SVG, `svg_data_uri` embeds it in the HTML leaderboard.
"""

from __future__ import annotations

import base64
import io
import itertools
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps, rcParams
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle

from merge_harness.core.atomic import atomic_write_bytes
from merge_harness.reports import metrics as m
from merge_harness.reports.frame import AVERAGE, Column, ComparisonTable, spec_params

rcParams["svg.fonttype"] = "none"  # text stays text: small, searchable SVGs
rcParams["svg.hashsalt"] = "merge-harness"  # stable ids, so the SVGs are reproducible
_SUBMODULE = re.compile(r"^layers\.(\d+)(?:\.(.+))?$")
PNG_DPI = 150
# One look per line of a sweep: colour, marker and line style all differ (readable in grey too).
LINE_STYLES = list(zip(colormaps["tab10"].colors, "osD^vPX*", ["-", "--", "-.", ":"] * 2))
HEATMAP = colormaps["viridis"].with_extremes(bad="#d9d9d9")  # grey: no score


# --------------------------------------------------------------------------- score heatmap


def score_heatmap(table: ComparisonTable) -> Figure:
    """Rows of the table (in its order) x its tasks and Avg.: the colour is the normalized score
    (% of that task's fine-tune) when the table has that block, else the score; each cell says
    the score in points, bold where the table bolds it. Lines part pre-trained | fine-tunes | merges."""
    score, normalized = table.block("score"), table.block("normalized")
    columns = [c.title for c in table.columns] + [AVERAGE]
    points = score.values[columns].to_numpy(dtype=float)
    shade = normalized.values[columns].to_numpy(dtype=float) if normalized is not None else points
    label = "% of the task's fine-tune" if normalized is not None else "score (points)"
    titles = list(table.rows["title"])
    width = 2.2 + 0.065 * max(map(len, titles), default=10) + 0.95 * len(columns)
    fig = Figure(figsize=(width, 1.6 + 0.24 * len(titles)), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    finite = shade[np.isfinite(shade)]
    top = max(100.0, float(finite.max())) if normalized is not None and finite.size else None
    image = ax.imshow(np.ma.masked_invalid(shade), aspect="auto", cmap=HEATMAP,
                      vmin=0 if top else None, vmax=top, interpolation="nearest")
    _annotate(ax, image, points, [[score.is_best(r, c) for c in columns] for r in table.rows.index])
    ax.set_xticks(range(len(columns)), [c.replace(" (", "\n(") for c in columns], fontsize=8)
    ax.xaxis.tick_top()
    ax.set_yticks(range(len(titles)), titles, fontsize=8)
    ax.tick_params(length=0)
    kinds = list(table.rows["kind"])
    for i in range(1, len(kinds)):
        if kinds[i] != kinds[i - 1]:
            ax.axhline(i - 0.5, color="white", linewidth=2.5)
    ax.axvline(len(columns) - 1.5, color="white", linewidth=2.5)  # the tasks | Avg.
    bar = fig.colorbar(image, ax=ax, label=label, shrink=min(1.0, 12 / max(len(titles), 1)) ** 0.5)
    bar.ax.tick_params(labelsize=8)
    ax.set_title(f"{table.experiment}: score per task (cell: points; framed, bold: best merge)", fontsize=9)
    return fig


def _annotate(ax, image, points: np.ndarray, bold: list[list[bool]]) -> None:
    """Each cell's score in points, black on light colours and white on dark ones."""
    for (i, j), value in np.ndenumerate(points):
        if math.isnan(value):
            ax.text(j, i, "–", ha="center", va="center", fontsize=7, color="#555555")
            continue
        shade = image.get_array()[i, j]
        r, g, b, _ = image.cmap(image.norm(shade)) if shade is not np.ma.masked else (0.85,) * 4
        light = 0.2126 * r + 0.7152 * g + 0.0722 * b > 0.45
        ax.text(j, i, f"{value:.1f}", ha="center", va="center", fontsize=7,
                color="black" if light else "white", fontweight="bold" if bold[i][j] else "normal")
        if bold[i][j]:  # the best merge of the column, framed as well as bold
            ax.add_patch(Rectangle((j - 0.46, i - 0.42), 0.92, 0.84, fill=False, linewidth=1.4,
                                   edgecolor="black" if light else "white"))


# --------------------------------------------------------------------- SLTA coefficients


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
    fig = Figure(figsize=(2.4 + 1.1 * grid.shape[1], 1.4 + 0.28 * grid.shape[0]), dpi=100,
                 layout="constrained")
    ax = fig.add_subplot()
    values = grid.to_numpy(dtype=float)
    image = ax.imshow(np.ma.masked_invalid(values), aspect="auto", cmap=HEATMAP)
    ax.set_xticks(range(grid.shape[1]), list(grid.columns), fontsize=8, rotation=30, ha="right")
    ax.set_yticks(range(grid.shape[0]), list(grid.index), fontsize=7)
    if grid.size <= 240:
        for (i, j), value in np.ndenumerate(values):
            if not math.isnan(value):
                r, g, b, _ = image.cmap(image.norm(value))
                light = 0.2126 * r + 0.7152 * g + 0.0722 * b > 0.45
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=6,
                        color="black" if light else "white")
    fig.colorbar(image, ax=ax, label="coefficient a_t").ax.tick_params(labelsize=8)
    ax.set_title(title, fontsize=9)
    return fig


# -------------------------------------------------------------------------------- sweeps


def sweeps(results: pd.DataFrame) -> list[tuple[str, str]]:
    """(method, parameter) pairs where a method's merges take 2+ numeric values of a parameter
    (merges that do not set it, e.g. a held-out search's row, do not count against it)."""
    found = []
    merges = results[results["method"].notna()].drop_duplicates("label")
    for method, rows in merges.groupby("method"):
        params = [spec_params(_spec(s)) for s in rows["spec_json"]]
        for name in sorted({k for p in params for k in p}):
            values = {p[name] for p in params if p.get(name) is not None}
            if len(values) > 1 and all(_numeric(v) for v in values):
                found.append((str(method), name))
    return found


def _spec(spec_json: str) -> dict:
    return json.loads(spec_json)


def _numeric(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def sweep_points(results: pd.DataFrame, method: str, parameter: str,
                 columns: Sequence[Column] | None = None) -> pd.DataFrame:
    """One row per (task title, x) of `method`'s merges: points, stderr (points, NaN if none) and
    whether x was chosen on held-out rows (`selected` in the spec) rather than set."""
    rows = results[results["method"] == method]
    if columns is None:
        columns = [Column(str(t), m.primary_metric(str(t), g["metric"].unique()), m.task_title(str(t)))
                   for t, g in rows.groupby("task")]
    records = []
    for row in rows.itertuples():
        column = next((c for c in columns if c.task == row.task and c.metric == row.metric), None)
        spec = _spec(row.spec_json)
        x, chosen = spec_params(spec).get(parameter), False
        selected = spec.get("selected")
        if isinstance(selected, dict) and selected.get("parameter") == parameter:
            x, chosen = selected.get("value"), True
        if column is None or not _numeric(x) or not _numeric(row.value):
            continue
        scale = m.points_per_unit(column.metric)
        se = getattr(row, "stderr", float("nan"))
        records.append({"task": column.title, "x": float(x), "points": row.value * scale,
                        "stderr": se * scale if _numeric(se) else float("nan"), "chosen": chosen})
    frame = pd.DataFrame.from_records(records, columns=["task", "x", "points", "stderr", "chosen"])
    order = {c.title: i for i, c in enumerate(columns)}
    return frame.sort_values(["task", "x"], key=lambda s: s.map(order) if s.name == "task" else s)


def sweep_plot(results: pd.DataFrame, method: str, parameter: str,
               columns: Sequence[Column] | None = None) -> Figure:
    """Score (points) against `parameter` for `method`'s merges: one line per task (the table's
    `columns`: their metrics and titles; default each task's primary metric), each with its own
    colour, marker and line style, ± stderr bars, and a star where the value was chosen on
    held-out rows. The legend lists only the lines drawn."""
    points = sweep_points(results, method, parameter, columns)
    fig = Figure(figsize=(6.4, 3.8), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    handles = []
    for (colour, marker, style), (task, line) in zip(itertools.cycle(LINE_STYLES),
                                                       points.groupby("task", sort=False)):
        line = line.groupby("x", as_index=False).agg(points=("points", "mean"), stderr=("stderr", "max"),
                                                     chosen=("chosen", "any"))
        yerr = line["stderr"].to_numpy(dtype=float)
        ax.errorbar(line["x"], line["points"], yerr=None if np.isnan(yerr).all() else np.nan_to_num(yerr),
                    color=colour, marker=marker, linestyle=style, linewidth=1.6, markersize=6,
                    capsize=3, elinewidth=1, label=task)
        chosen = line[line["chosen"]]
        ax.scatter(chosen["x"], chosen["points"], marker="*", s=180, color=colour,
                   edgecolor="black", linewidth=0.6, zorder=5)
        handles.append(Line2D([], [], color=colour, marker=marker, linestyle=style, label=task))
    average = _sweep_average(points)
    if len(average) > 1:
        ax.plot(average.index, average.to_numpy(), color="black", marker="h", linewidth=2.6,
                markersize=7, alpha=0.8, zorder=4)
        handles.append(Line2D([], [], color="black", marker="h", linewidth=2.6, label=AVERAGE))
    if points["chosen"].any():
        handles.append(Line2D([], [], marker="*", linestyle="none", markersize=11, color="white",
                              markeredgecolor="black", label=f"{parameter} chosen on held-out rows"))
    if not np.isnan(points["stderr"].to_numpy(dtype=float)).all():
        handles.append(Line2D([], [], color="grey", marker="|", linestyle="none", markersize=10,
                              label="± lm-eval stderr"))
    ax.set_xlabel(parameter)
    ax.set_ylabel("score (points)")
    ax.set_title(f"{m.METHOD_TITLES.get(method, method)}: score vs {parameter}", fontsize=9)
    if handles:
        ax.legend(handles=handles, fontsize=7, frameon=False, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.grid(alpha=0.3)
    return fig


def _sweep_average(points: pd.DataFrame) -> pd.Series:
    """x -> mean score over the tasks, at the x where every task of the sweep has a score."""
    grid = points.pivot_table(index="x", columns="task", values="points", aggfunc="mean")
    if grid.shape[1] < 2:  # one task: its line is the average
        return pd.Series(dtype=float)
    return grid.dropna().mean(axis=1)


# --------------------------------------------------------------------------------- files


def figure_bytes(fig: Figure, fmt: str) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format=fmt, bbox_inches="tight", pad_inches=0.05,
                dpi=PNG_DPI if fmt == "png" else "figure",
                metadata={"Date": None} if fmt == "svg" else None)
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
