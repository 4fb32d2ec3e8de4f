"""What the CLI calls: a result store in, report files (written atomically) or texts out.

    merge-harness report [--experiment NAME] [--format md|latex|csv|json|html|all] [--out DIR]
                         [--paper NAME] [--normalized] [--delta]
        -> write_report(...) / render_paper(...)
    merge-harness check --golden FILE [--update] [--tolerance X] [--tolerance-stderr K]
                        [--junit FILE] [--summary FILE]
        -> run_check(...)

An empty store or an unknown experiment is a `StoreError` / `ConfigError` naming the store path
and the experiments it holds.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from merge_harness.core.atomic import atomic_write_text
from merge_harness.core.errors import ConfigError
from merge_harness.reports import check as checking
from merge_harness.reports import paper, plots, source
from merge_harness.reports.csv_table import render_csv
from merge_harness.reports.frame import ComparisonTable, TableOptions, comparison_table
from merge_harness.reports.html import job_details, render_html
from merge_harness.reports.json_table import render_json
from merge_harness.reports.latex import render_latex
from merge_harness.reports.markdown import render_markdown
from merge_harness.store.database import ResultStore

FORMATS = ("md", "latex", "csv", "json", "html")
RENDERERS = {"md": (render_markdown, "md"), "latex": (render_latex, "tex"),
             "csv": (render_csv, "csv"), "json": (render_json, "json")}
LEADERBOARD = "leaderboard.html"


def parse_formats(formats: str | Sequence[str]) -> list[str]:
    """"md,html" or ["md", "html"] or "all" -> the list of formats; unknown names are an error."""
    names = re.split(r"[,\s]+", formats) if isinstance(formats, str) else list(formats)
    names = [n for n in names if n]
    if "all" in names:
        return list(FORMATS)
    if unknown := [n for n in names if n not in FORMATS]:
        raise ConfigError(f"unknown report format(s) {unknown}; choose from "
                          f"{', '.join(FORMATS)} or all")
    return list(dict.fromkeys(names)) or ["md"]


def _file_stem(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "experiment"


def _figures(store: ResultStore, table: ComparisonTable,
             out_dir: Path | None) -> tuple[list[tuple[str, str]], list[Path]]:
    """(caption, SVG data URI) per figure of one experiment, and its PNG/SVG files if `out_dir`."""
    results, stem = store.results_frame(table.experiment), _file_stem(table.experiment)
    figures = [(f"{stem}_scores", f"{table.experiment}: score per task", plots.task_bars(table))]
    for label, coefficients in source.coefficients_for(store, results).items():
        title = table.rows.at[label, "title"] if label in table.rows.index else label
        figures.append((f"{stem}_coefficients_{_file_stem(title)}",
                        f"{table.experiment}: {title} coefficients per submodule and task",
                        plots.coefficient_heatmap(coefficients, f"{title}: a_t per submodule")))
    for method, parameter in plots.sweeps(results):
        figures.append((f"{stem}_sweep_{_file_stem(method)}_{_file_stem(parameter)}",
                        f"{table.experiment}: {method} score vs {parameter}",
                        plots.sweep_plot(results, method, parameter)))
    written: list[Path] = []
    embedded: list[tuple[str, str]] = []
    for name, caption, fig in figures:
        if out_dir is None:
            svg = plots.figure_bytes(fig, "svg")
        else:
            paths, svg = plots.save(fig, out_dir / "plots" / name)
            written += paths
        embedded.append((caption, plots.svg_data_uri(svg)))
    return embedded, written


def write_report(store: ResultStore, experiment: str | None, out_dir: Path,
                 formats: str | Sequence[str] = ("md",), *, normalized: bool = False,
                 delta: bool = False, with_plots: bool = True) -> list[Path]:
    """Render `experiment` (or every experiment with results) into `out_dir`; returns the files.

    Per experiment: `<experiment>.md|.tex|.csv|.json`; for all of them one `leaderboard.html`;
    figures (PNG + SVG) under `plots/` when `with_plots` (the leaderboard embeds them anyway).
    """
    formats = parse_formats(formats)
    out_dir = Path(out_dir)
    options = TableOptions(normalized=normalized, delta=delta)
    tables = [comparison_table(store, name, options)
              for name in source.resolve_experiments(store, experiment)]
    written: list[Path] = []
    for table in tables:
        for fmt in formats:
            if fmt in RENDERERS:
                render, extension = RENDERERS[fmt]
                path = out_dir / f"{_file_stem(table.experiment)}.{extension}"
                written.append(atomic_write_text(path, render(table)))
    figures: list[tuple[str, str]] = []
    if with_plots or "html" in formats:
        for table in tables:
            embedded, files = _figures(store, table, out_dir if with_plots else None)
            written += files
            figures += embedded
    if "html" in formats:
        details = {}
        for table in tables:
            results = store.results_frame(table.experiment)
            versions = source.job_versions(store, results["key"].unique())
            details.update({(table.experiment, label): detail
                            for label, detail in job_details(results, versions).items()})
        page = render_html(tables, details, figures)
        written.append(atomic_write_text(out_dir / LEADERBOARD, page))
    return written


def render_paper(store: ResultStore, name: str | Path) -> str:
    """The paper table `name` (reports/paper/NAME.yaml, or a path) as Markdown, measured vs paper."""
    spec = paper.load_spec(name)
    measured = set(source.experiment_names(store, with_results=True))
    results = {s.experiment: store.results_frame(s.experiment)
               for s in spec.model_sets if s.experiment in measured}
    return paper.render_markdown(spec, results, str(store.path))


def write_paper(store: ResultStore, name: str | Path, out_dir: Path) -> Path:
    """`render_paper` into `out_dir`/paper_<name>.md."""
    stem = _file_stem(Path(str(name)).stem if str(name).endswith(".yaml") else str(name))
    return atomic_write_text(Path(out_dir) / f"paper_{stem}.md", render_paper(store, name))


class CheckOutcome(NamedTuple):
    exit_code: int  # 0 passed (or golden updated), 1 regressed or missing results
    summary_md: str
    junit_xml: str  # "" after --update


def _golden_experiment(store: ResultStore, experiment: str | None, golden: Path) -> str:
    if experiment:
        return experiment
    if golden.is_file():
        return checking.load_golden(golden)["experiment"]
    known = source.resolve_experiments(store, None)
    if len(known) > 1:
        raise ConfigError(f"the store {store.path} holds several experiments ({', '.join(known)}); "
                          "say which one to record with --experiment")
    return known[0]


def run_check(store: ResultStore, experiment: str | None, golden: Path,
              tolerance: checking.Tolerance = checking.Tolerance(), *, update: bool = False,
              junit: Path | None = None, summary: Path | None = None) -> CheckOutcome:
    """Compare the store's results to `golden` (or record them there with `update`).

    `experiment` defaults to the golden file's; naming another one is an error (a golden file
    from another experiment). Writes `junit` and `summary` when given.
    """
    golden = Path(golden)
    if update:
        name = _golden_experiment(store, experiment, golden)
        source.resolve_experiments(store, name)
        frame = store.results_frame(name)
        checking.write_golden(frame, golden, name)
        text = f"Recorded {len(frame)} results of experiment `{name}` in {golden}.\n"
        if summary is not None:
            atomic_write_text(Path(summary), text)
        return CheckOutcome(0, text, "")
    data = checking.load_golden(golden)
    if experiment is not None and experiment != data["experiment"]:
        raise ConfigError(f"golden file {golden} was recorded for experiment "
                          f"{data['experiment']!r}, not {experiment!r}; use a golden file of "
                          f"{experiment!r} (record one with --update) or drop --experiment")
    source.resolve_experiments(store, data["experiment"])
    result = checking.check(store.results_frame(data["experiment"]), data, tolerance)
    outcome = CheckOutcome(result.exit_code, checking.summary_markdown(result, str(golden)),
                           checking.junit_xml(result))
    if junit is not None:
        atomic_write_text(Path(junit), outcome.junit_xml)
    if summary is not None:
        atomic_write_text(Path(summary), outcome.summary_md)
    return outcome
