"""Plots of a demo-sized table (tests/test_reports_latex.py's 29 rows x 4 tasks): the score heatmap
(rows in table order, colour = % of the task's fine-tune, text = points, a colorbar, nothing
clipped), the sweep (distinct colour + marker + line style per task, stderr bars, a legend of
only what is drawn) and the file names `write_report` keeps.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from merge_harness.reports import commands, plots
from merge_harness.reports.frame import TableOptions, comparison_table
from merge_harness.store.database import ResultStore
from tests.test_reports_latex import WIDE, WIDE_TASKS, wide_store


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    with ResultStore(wide_store(tmp_path_factory.mktemp("plots") / "results.sqlite")) as store:
        yield store


def _inside(fig, artists) -> bool:
    """Every artist's drawn box lies inside the figure (nothing clipped at the edges)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    page = fig.bbox.padded(1)
    renderer = canvas.get_renderer()
    boxes = [a.get_window_extent(renderer) for a in artists if a.get_visible() and a.get_text()]
    return all(page.x0 <= b.x0 and b.x1 <= page.x1 and page.y0 <= b.y0 and b.y1 <= page.y1 for b in boxes)


def test_score_heatmap_rows_follow_the_table_and_cells_say_points(wide):
    table = comparison_table(wide, WIDE, TableOptions(normalized=True))
    fig = plots.score_heatmap(table)
    heat, bar = fig.axes[0], fig.axes[1]
    assert [t.get_text() for t in heat.get_yticklabels()] == list(table.rows["title"])
    assert len(heat.get_xticklabels()) == len(WIDE_TASKS) + 1  # the tasks and Avg.
    shade = heat.images[0].get_array()
    assert shade.shape == (29, 5)
    assert shade[table.rows.index.get_loc("math"), 0] == pytest.approx(100.0)  # the fine-tune itself
    texts = [t.get_text() for t in heat.texts]
    assert "62.0" in texts and len(texts) == 29 * 5  # raw points in every cell
    assert "fine-tune" in bar.get_ylabel()  # the colorbar says what the colour is
    assert _inside(fig, [*heat.get_yticklabels(), *heat.get_xticklabels(), heat.title, bar.yaxis.label])


def test_score_heatmap_without_a_fine_tune_mapping_is_coloured_by_points(wide):
    table = comparison_table(wide, WIDE)  # no normalized block
    fig = plots.score_heatmap(table)
    assert fig.axes[1].get_ylabel() == "score (points)"
    shade = fig.axes[0].images[0].get_array()
    assert shade[0, 0] == pytest.approx(table.block("score").values.iloc[0, 0])


def test_sweep_lines_are_distinct_with_stderr_bars_and_an_honest_legend(wide):
    table = comparison_table(wide, WIDE)
    results = wide.results_frame(WIDE)
    assert plots.sweeps(results) == [("task_arithmetic", "lambda")]  # the held-out row does not hide it
    fig = plots.sweep_plot(results, "task_arithmetic", "lambda", table.columns)
    ax = fig.axes[0]
    lines = [bars.lines[0] for bars in ax.containers  # errorbar: (data line, caps, bars)
             if bars.get_label() in {c.title for c in table.columns}]
    looks = {(line.get_color(), line.get_marker(), line.get_linestyle()) for line in lines}
    assert len(lines) == len(WIDE_TASKS) == len(looks)
    assert len({c for c, _, _ in looks}) == len({m for _, m, _ in looks}) == len(looks)
    assert all(bars.has_yerr for bars in ax.containers), "no error bars"
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend[:4] == [c.title for c in table.columns]
    assert legend[4:] == ["Avg.", "lambda chosen on held-out rows", "± lm-eval stderr"]
    points = plots.sweep_points(results, "task_arithmetic", "lambda", table.columns)
    assert sorted(points["x"].unique()) == [0.5, 0.7, 1.0] and points["chosen"].sum() == len(WIDE_TASKS)
    assert (points["stderr"] > 0).all()


def test_sweep_legend_lists_only_lines_with_points():
    spec = '{"kind": "merge", "merge": {"method": "ties", "parameters": {"density": %s}}}'
    rows = [{"label": f"ties {d}", "method": "ties", "task": task, "metric": "acc", "value": v,
             "stderr": np.nan, "spec_json": spec % d}
            for d in (0.3, 0.6) for task, v in (("winogrande_fixture", 0.6), ("empty_task", np.nan))]
    fig = plots.sweep_plot(pd.DataFrame(rows), "ties", "density")
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert legend == ["Winogrande (fixture)"]  # no NaN-only line, no stderr entry without stderr


def test_write_report_keeps_the_plot_file_names(wide, tmp_path):
    written = commands.write_report(wide, WIDE, tmp_path, "md")
    names = {p.relative_to(tmp_path).as_posix() for p in written}
    assert {f"plots/{WIDE}_scores.png", f"plots/{WIDE}_scores.svg",
            f"plots/{WIDE}_sweep_task_arithmetic_lambda.png",
            f"plots/{WIDE}_coefficients_SLTA_attn_MLP.svg"} <= names
    assert (tmp_path / f"plots/{WIDE}_scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
