"""SLTA's solved coefficients per layer and task, next to the best global task-arithmetic lambda.

Task arithmetic with weights 1 gives every task and every submodule the same coefficient:
theta_0 + lambda * sum_t tau_t. SLTA (Dai et al., ICLR 2025; `merge_harness.merges.slta`) solves one a_t per
submodule instead. Plotting the solved a_t^i per layer against the lambda that `search` picked
on held-out train data shows where SLTA departs from one global coefficient.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from merge_harness.diagnostics.tables import markdown_table
from merge_harness.merge.config import MergeConfig
from merge_harness.merge.engine import merge_state_dict
from merge_harness.reports.plots import submodule_order
from merge_harness.selection.answers import DataSettings

GRANULARITIES = ("layer", "attn_mlp")


def slta_coefficients(
    base: str | Path,
    finetunes: Mapping[str, str | Path],
    calibration: Mapping[str, str | Path],
    granularity: str = "attn_mlp",
    data: DataSettings = DataSettings(),
) -> pd.DataFrame:
    """SLTA's a_t per submodule: columns submodule, task, value (in layer order; non_layer last)."""
    config = MergeConfig(
        method="slta",
        base_model=str(base),
        models=[{"model": str(finetunes[t]), "calibration": str(calibration[t])} for t in finetunes],
        parameters={"granularity": granularity, "num_samples": data.num_samples, "seed": data.seed},
        calibration={
            "template": data.template,
            "max_length": data.max_length,
            "batch_size": data.batch_size,
            "allow_fewer": True,
        },
    )
    outcome = merge_state_dict(config)
    labels = {Path(str(path).rstrip("/")).name: task for task, path in finetunes.items()}
    frame = pd.DataFrame(
        [
            {"submodule": c.submodule, "task": labels.get(c.task, c.task), "value": c.value}
            for c in outcome.coefficients
        ]
    )
    order = sorted(frame["submodule"].unique(), key=submodule_order)
    frame["submodule"] = pd.Categorical(frame["submodule"], order, ordered=True)
    return frame.sort_values(["submodule", "task"]).reset_index(drop=True)


def compare_with_lambda(coefficients: pd.DataFrame, best_lambda: float) -> pd.DataFrame:
    """Rows = submodules, columns = tasks: a_t^i, plus each task's mean and its gap to lambda."""
    grid = coefficients.pivot_table(
        index="submodule", columns="task", values="value", aggfunc="first", observed=True
    )
    grid.loc["mean over submodules"] = grid.mean()
    grid.loc["mean - best lambda"] = grid.loc["mean over submodules"] - best_lambda
    return grid


def slta_figure(coefficients: pd.DataFrame, best_lambda: float | None, title: str) -> Figure:
    """a_t per submodule (x, layer order), a line per task; the best global lambda dashed."""
    layers = coefficients[coefficients["submodule"].astype(str) != "non_layer"]
    order = [str(s) for s in layers["submodule"].cat.remove_unused_categories().cat.categories]
    fig = Figure(figsize=(max(5.0, 0.35 * len(order) + 2), 3.6), dpi=100)
    ax = fig.add_subplot()
    for task, rows in layers.groupby("task", sort=False):
        values = rows.set_index(rows["submodule"].astype(str))["value"].reindex(order)
        ax.plot(range(len(order)), values.to_numpy(float), marker="o", label=str(task))
    if best_lambda is not None:
        ax.axhline(best_lambda, color="black", linestyle="--", label=f"best global lambda {best_lambda:g}")
    finish_coefficient_axes(ax, order, title)
    fig.tight_layout()
    return fig


def finish_coefficient_axes(ax, order: list[str], title: str, max_ticks: int = 60) -> None:
    """Submodule ticks (every k-th when there are many), labels, legend and grid of a plot of a_t."""
    step = max(1, -(-len(order) // max_ticks))
    labels = [str(s).removeprefix("layers.") for s in order][::step]
    ax.set_xticks(range(0, len(order), step), labels, rotation=60, fontsize=7 if step == 1 else 6)
    ax.set_xlabel("submodule")
    ax.set_ylabel("coefficient a_t")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(alpha=0.3)


def slta_report(
    base: str | Path,
    finetunes: Mapping[str, str | Path],
    calibration: Mapping[str, str | Path],
    out_dir: str | Path,
    best_lambda: float | None = None,
    granularity: str = "attn_mlp",
    data: DataSettings = DataSettings(),
) -> tuple[pd.DataFrame, list[Path]]:
    """SLTA's coefficients (CSV, Markdown vs `best_lambda`) and their plot (PNG + SVG)."""
    from merge_harness.reports.plots import save

    frame = slta_coefficients(base, finetunes, calibration, granularity, data)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"slta_{granularity}"
    frame.to_csv(out / f"{stem}.csv", index=False)
    paths = [out / f"{stem}.csv"]
    if best_lambda is not None:
        (out / f"{stem}.md").write_text(
            f"SLTA coefficients ({granularity}) vs the best global task-arithmetic "
            f"lambda = {best_lambda:g}\n\n"
            + markdown_table(compare_with_lambda(frame, best_lambda), "submodule")
        )
        paths.append(out / f"{stem}.md")
    figure = slta_figure(frame, best_lambda, f"SLTA coefficients per submodule ({granularity})")
    paths += save(figure, out / stem)[0]
    return frame, paths
