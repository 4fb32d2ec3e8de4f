"""What the CLI calls: a result store in, report files (written atomically) or texts out.

    merge-harness report [--experiment NAME] [--format md|latex|csv|json|html|all] [--out DIR]
                         [--paper NAME] [--normalized] [--delta]
        -> write_report(...) / render_paper(...)   (latex: <experiment>.tex to \\input, and
           <experiment>.standalone.tex, a whole document for pdflatex)
    merge-harness check --golden FILE [--update] [--tolerance X] [--tolerance-stderr K]
                        [--junit FILE] [--summary FILE]
        -> run_check(...)

An empty store or an unknown experiment is a `StoreError` / `ConfigError` naming the store path
and the experiments it holds.
"""

from __future__ import annotations

import functools
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
# Written next to a format's file: the LaTeX tables as a whole document that compiles on its own.
COMPANIONS = {"latex": (functools.partial(render_latex, standalone=True), "standalone.tex")}
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


def _with_normalized(store: ResultStore, table: ComparisonTable) -> ComparisonTable:
    """`table`, with the normalized block the score heatmap is coloured by when the experiment
    maps its fine-tunes to the tasks (else `table` as it is: the heatmap is coloured by points)."""
    try:
        config = source.experiment_config(store, table.experiment)
        return table.with_normalized(source.finetune_tasks(config))
    except ConfigError:
        return table


def _figures(store: ResultStore, table: ComparisonTable,
             out_dir: Path | None) -> tuple[list[tuple[str, str]], list[Path]]:
    """(caption, SVG data URI) per figure of one experiment, and its PNG/SVG files if `out_dir`."""
    results, stem = store.results_frame(table.experiment), _file_stem(table.experiment)
    figures = [(f"{stem}_scores", f"{table.experiment}: score per task (colour: % of the fine-tune)",
                plots.score_heatmap(_with_normalized(store, table)))]
    for label, coefficients in source.coefficients_for(store, results).items():
        title = table.rows.at[label, "title"] if label in table.rows.index else label
        figures.append((f"{stem}_coefficients_{_file_stem(title)}",
                        f"{table.experiment}: {title} coefficients per submodule and task",
                        plots.coefficient_heatmap(coefficients, f"{title}: a_t per submodule")))
    for method, parameter in plots.sweeps(results):
        figures.append((f"{stem}_sweep_{_file_stem(method)}_{_file_stem(parameter)}",
                        f"{table.experiment}: {method} score vs {parameter}",
                        plots.sweep_plot(results, method, parameter, table.columns)))
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
                 delta: bool = False, with_plots: bool = True, stderr: bool | None = None,
                 baseline: str | None = None, standalone: bool = True) -> list[Path]:
    """Render `experiment` (or every experiment with results) into `out_dir`; returns the files.

    Per experiment: `<experiment>.md|.tex|.csv|.json` (with `standalone`, the LaTeX also as
    `<experiment>.standalone.tex`, a document for pdflatex); for all of them one `leaderboard.html`;
    figures (PNG + SVG) under `plots/` when `with_plots` (the leaderboard embeds them anyway).
    `stderr`: "± se" after scores (default: in the leaderboard only); `baseline`: the row label
    the paired test and Δ compare with (default: task arithmetic).
    """
    formats = parse_formats(formats)
    out_dir = Path(out_dir)
    options = TableOptions(normalized=normalized, delta=delta, stderr=bool(stderr), baseline=baseline)
    names = source.resolve_experiments(store, experiment)
    tables = [comparison_table(store, name, options) for name in names]
    written: list[Path] = []
    for table in tables:
        for fmt in formats:
            outputs = [RENDERERS[fmt]] if fmt in RENDERERS else []
            if standalone and fmt in COMPANIONS:
                outputs.append(COMPANIONS[fmt])
            for render, extension in outputs:
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
        shown = True if stderr is None else stderr  # on by default on the leaderboard: it has room
        page = render_html([table.showing_stderr(shown) for table in tables], details, figures)
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
              junit: Path | None = None, summary: Path | None = None,
              primary_only: bool = False) -> CheckOutcome:
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
    result = checking.check(store.results_frame(data["experiment"]), data, tolerance, primary_only)
    outcome = CheckOutcome(result.exit_code, checking.summary_markdown(result, str(golden)),
                           checking.junit_xml(result))
    if junit is not None:
        atomic_write_text(Path(junit), outcome.junit_xml)
    if summary is not None:
        atomic_write_text(Path(summary), outcome.summary_md)
    return outcome
