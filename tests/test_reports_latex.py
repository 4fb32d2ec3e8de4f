"""LaTeX that compiles: a demo-sized comparison table (29 rows, long method titles, 4 tasks,
costs, normalized and delta blocks, stderr shown) rendered as a standalone document and as an
\\input fragment, compiled with pdflatex -halt-on-error; any error or "Overfull \\hbox" fails.

Needs pdflatex (`apt-get install -y --no-install-recommends texlive-latex-base
texlive-latex-recommended`); without it the compile tests are skipped and say so.
`wide_store` is also the table of the plot tests (tests/test_reports_plots.py).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from merge_harness.core.results import Coefficient, JobResult, Score
from merge_harness.reports import commands
from merge_harness.reports.frame import TableOptions, comparison_table
from merge_harness.reports.latex import render_latex
from merge_harness.store.database import ResultStore, content_key

WIDE = "demo-wide"
WIDE_TASKS = {  # task -> (primary metric, points per stored unit)
    "gsm8k_fixture": ("exact_match,strict-match", 0.01),
    "humaneval_sandboxed_fixture": ("pass@1", 0.01),
    "winogrande_fixture": ("acc", 0.01),
    "wmt22_zh_en_fixture": ("bleu", 1.0),
}
WIDE_FINETUNES = dict(zip(["math", "code", "qa", "translate"], WIDE_TASKS))
# label -> (method, parameters); label == method (or "method (...)") gets the method's title
WIDE_MERGES = {
    "linear": ("linear", {}),
    "task_arithmetic (lambda=0.5)": ("task_arithmetic", {"lambda": 0.5}),
    "task_arithmetic (lambda=1.0)": ("task_arithmetic", {"lambda": 1.0}),
    "task_arithmetic (held-out lambda)": ("task_arithmetic", {}),
    "ties": ("ties", {"density": 0.5, "lambda": 1.0}),
    "dare_linear": ("dare_linear", {"density": 0.5}),
    "dare_ties": ("dare_ties", {"density": 0.5}),
    "breadcrumbs": ("breadcrumbs", {"density": 0.5, "gamma": 0.05}),
    "breadcrumbs_ties": ("breadcrumbs_ties", {"density": 0.5, "gamma": 0.05}),
    "della": ("della", {"density": 0.5, "epsilon": 0.1}),
    "della_linear": ("della_linear", {"density": 0.5, "epsilon": 0.1}),
    "model_stock": ("model_stock", {}),
    "regmean": ("regmean", {}),
    "fisher": ("fisher", {}),
    "SLTA (model)": ("slta", {"granularity": "model"}),
    "SLTA (layer)": ("slta", {"granularity": "layer"}),
    "SLTA (attn/MLP)": ("slta", {"granularity": "attn_mlp"}),
    "multislerp": ("multislerp", {"weight": 1.0}),
    "karcher": ("karcher", {}),
    "sce": ("sce", {}),
    "ramplus_tl": ("ramplus_tl", {}),
    "slerp (base-math, t=0.5)": ("slerp", {"t": 0.5}),
    "nuslerp (math+code)": ("nuslerp", {"weight": 0.5}),
    "arcee_fusion (base-math)": ("arcee_fusion", {}),
}
PDFLATEX = shutil.which("pdflatex")
needs_pdflatex = pytest.mark.skipif(
    PDFLATEX is None, reason="pdflatex is not installed (apt-get install -y --no-install-recommends "
                             "texlive-latex-base texlive-latex-recommended): LaTeX NOT compiled")


def _points(label: str, t: int) -> float:
    """A deterministic score in points: fine-tunes best on their own task, merges in between."""
    if label == "pre-trained":
        return 8.0 + 3 * t
    if label in WIDE_FINETUNES:
        return 62.0 + 4 * t if list(WIDE_FINETUNES).index(label) == t else 12.0 + 2 * t
    rank = list(WIDE_MERGES).index(label)
    return 25.0 + (rank * 7 + t * 13) % 31 + 0.25 * t


def _job(label: str, task: str, t: int) -> JobResult:
    method, params = WIDE_MERGES.get(label, (None, {}))
    kind = "base" if label == "pre-trained" else "finetune" if method is None else "merge"
    spec = {"label": label, "kind": kind, "task": task, "model": {"files": {"m.safetensors": label}}}
    if method:
        spec["merge"] = {"method": method, "parameters": params}
    if "held-out" in label:
        spec["selected"] = {"parameter": "lambda", "value": 0.7}
    metric, per_point = WIDE_TASKS[task]
    value = _points(label, t) * per_point
    stderr = (0.7 + 0.1 * t) * per_point * (1 if per_point == 1 else 3)
    coefficients = ([Coefficient(f"layers.{i}.{part}", f, round(0.3 + 0.05 * i + 0.1 * j, 3))
                     for i in range(4) for part in ("self_attn", "mlp")
                     for j, f in enumerate(WIDE_FINETUNES)] if label == "SLTA (attn/MLP)" else [])
    timings = {"evaluate": 9.0, **({"merge": 2.0 + len(label) / 7} if method else {})}
    return JobResult(key=content_key(spec), experiment=WIDE, model_label=label, spec=spec,
                     scores=[Score(task, metric, round(value, 6), round(stderr, 6), 200)],
                     coefficients=coefficients, timings=timings, versions={},
                     peak_rss_mb=700.0 + 13 * len(label))


def wide_store(path: Path) -> Path:
    """A store like the demo's: pre-trained, 4 fine-tunes and 24 merges on 4 tasks."""
    with ResultStore(path) as store:
        store.ensure_experiment(WIDE, {
            "name": WIDE, "base_model": "zoo/base", "tasks": list(WIDE_TASKS),
            "finetunes": {f: {"model": f"zoo/{f}", "task": t} for f, t in WIDE_FINETUNES.items()}})
        for label in ["pre-trained", *WIDE_FINETUNES, *WIDE_MERGES]:
            for t, task in enumerate(WIDE_TASKS):
                store.record(_job(label, task, t))
    return path


@pytest.fixture(scope="module")
def wide_path(tmp_path_factory) -> Path:
    return wide_store(tmp_path_factory.mktemp("wide") / "results.sqlite")


@pytest.fixture(scope="module")
def wide_table(wide_path):
    with ResultStore(wide_path) as store:
        return comparison_table(store, WIDE, TableOptions(normalized=True, delta=True, stderr=True))


def compile_latex(directory: Path, name: str) -> str:
    """pdflatex `name` in `directory`; fails the test on an error or any Overfull \\hbox (with the
    offending lines of the log), returns the log."""
    run = subprocess.run([PDFLATEX, "-interaction=nonstopmode", "-halt-on-error", name],
                         cwd=directory, capture_output=True, text=True, timeout=120)
    log_path = directory / Path(name).with_suffix(".log")
    log = log_path.read_text(encoding="latin-1") if log_path.exists() else run.stdout
    assert run.returncode == 0, f"pdflatex failed on {name}:\n{log[-3000:]}"
    overfull = [line for line in log.splitlines() if re.match(r"Overfull \\hbox", line)]
    assert not overfull, f"{name} overflows the text width:\n" + "\n".join(overfull)
    assert (directory / Path(name).with_suffix(".pdf")).stat().st_size > 1000
    return log


def test_the_wide_table_is_demo_sized(wide_table):
    assert len(wide_table.rows) == 29 and [b.name for b in wide_table.blocks] == [
        "score", "normalized", "delta"]
    assert list(wide_table.block("score").values.columns)[-3:] == ["Avg.", "Merge (s)", "Peak RSS (MB)"]
    assert "Task Arithmetic (held-out lambda)" in set(wide_table.rows["title"])


def test_standalone_is_a_whole_document_and_the_fragment_is_not(wide_table):
    document, fragment = render_latex(wide_table, standalone=True), render_latex(wide_table)
    assert document.count(r"\documentclass{article}") == 1 and document.rstrip().endswith(r"\end{document}")
    for package in ("booktabs", "graphicx", "geometry"):
        assert re.search(r"\\usepackage(\[[^]]*\])?\{" + package + "}", document), package
    assert r"\documentclass" not in fragment and r"\begin{document}" not in fragment
    assert fragment.count(r"\begin{table}") == document.count(r"\begin{table}") == 3
    assert fragment.count(r"\resizebox{\ifdim\width>\linewidth\linewidth\else\width\fi}") == 1
    assert fragment.count(r"\mhfittowidth{%") == 3  # every table fits the text width
    assert r"\,$\pm$\," in fragment  # stderr is shown


@needs_pdflatex
def test_wide_standalone_document_compiles_without_overfull_boxes(wide_table, tmp_path):
    (tmp_path / "wide.tex").write_text(render_latex(wide_table, standalone=True), encoding="utf-8")
    log = compile_latex(tmp_path, "wide.tex")
    assert "Output written on wide.pdf" in log


@needs_pdflatex
def test_wide_fragment_fits_a_default_article_when_input(wide_table, tmp_path):
    (tmp_path / "table.tex").write_text(render_latex(wide_table), encoding="utf-8")
    (tmp_path / "paper.tex").write_text(
        "\\documentclass{article}\n\\usepackage{booktabs}\n\\usepackage{graphicx}\n"
        "\\emergencystretch=2em\n\\begin{document}\n\\input{table.tex}\n\\end{document}\n")
    compile_latex(tmp_path, "paper.tex")


@needs_pdflatex
def test_write_report_latex_writes_fragment_and_standalone_that_compiles(wide_path, tmp_path):
    with ResultStore(wide_path) as store:
        written = commands.write_report(store, WIDE, tmp_path, "latex", with_plots=False)
    assert sorted(p.name for p in written) == [f"{WIDE}.standalone.tex", f"{WIDE}.tex"]
    compile_latex(tmp_path, f"{WIDE}.standalone.tex")
