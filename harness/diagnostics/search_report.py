"""`merge-harness analyze search`: a coefficient search (`merge_harness.selection.search`) written
out as search.json, search.csv and a plot of the held-out metric against the searched value."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from matplotlib.figure import Figure

from merge_harness.reports.plots import save
from merge_harness.selection.answers import DataSettings
from merge_harness.selection.search import CoefficientSearch, SearchSpec, search_coefficient


def search_figure(result: CoefficientSearch) -> Figure:
    """The held-out metric against the searched value: a line per task, the mean bold, the pick marked."""
    frame = result.frame()
    fig = Figure(figsize=(5.0, 3.4), dpi=100)
    ax = fig.add_subplot()
    for task, rows in frame.groupby("task", sort=False):
        style = {"color": "black", "linewidth": 2.2} if task == "mean" else {"alpha": 0.8}
        ax.plot(rows["value"], rows["score"], marker=".", label=str(task), **style)
    ax.axvline(result.chosen, color="grey", linestyle="--", label=f"chosen {result.chosen:g}")
    ax.set_xlabel(result.parameter)
    ax.set_ylabel(f"held-out {result.metric}")
    ax.set_title(f"{result.method}: {result.parameter} on held-out train data", fontsize=9)
    ax.legend(fontsize=7, frameon=False)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def search_report(
    base: str | Path,
    finetunes: Mapping[str, str | Path],
    held_out: Mapping[str, str | Path],
    out_dir: str | Path,
    spec: SearchSpec = SearchSpec(),
    data: DataSettings = DataSettings(),
    forbidden: Sequence[str | Path] = (),
) -> tuple[CoefficientSearch, list[Path]]:
    """`merge-harness analyze search`: the result, and search.json, search.csv, the plot (PNG+SVG)."""
    result = search_coefficient(base, finetunes, held_out, spec, data, forbidden)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "search.json").write_text(json.dumps(result.to_record(), indent=2) + "\n")
    result.frame().to_csv(out / "search.csv", index=False)
    paths, _ = save(search_figure(result), out / "search")
    return result, [out / "search.json", out / "search.csv", *paths]
