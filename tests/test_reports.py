"""Reports: the comparison table, its renderers (against golden files), plots, paper specs, errors.

The store is built by hand (`build_store`): a pre-trained row, three fine-tunes, task arithmetic
at two lambdas, TIES, DARE-TIES and SLTA at layer and attn/MLP granularity (with coefficients),
on three fixture tasks. Golden files live in tests/golden/; after an intended change, regenerate
them with

    UPDATE_GOLDEN=1 .venv/bin/pytest tests/test_reports.py -q

and review the diff (`git diff tests/golden`) before committing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from merge_harness.core.errors import ConfigError, HarnessError, StoreError
from merge_harness.core.results import Coefficient, JobResult, Score
from merge_harness.reports import commands, paper, plots
from merge_harness.reports.csv_table import render_csv
from merge_harness.reports.frame import TableOptions, build_table, comparison_frame, comparison_table
from merge_harness.reports.latex import render_latex
from merge_harness.reports.markdown import render_markdown
from merge_harness.store.database import ResultStore, content_key

GOLDEN = Path(__file__).parent / "golden"
EXPERIMENT = "demo"
TASKS = {  # task -> {metric: (lm-eval scale value of the pre-trained model, stderr)}
    "gsm8k_fixture": {"exact_match,strict-match": 0.10, "exact_match,flexible-extract": 0.15},
    "humaneval_sandboxed_fixture": {"pass@1": 0.05},
    "wmt22_zh_en_fixture": {"bleu": 8.0, "chrf": 30.0},
}
FINETUNES = {"math": "gsm8k_fixture", "code": "humaneval_sandboxed_fixture",
             "translate": "wmt22_zh_en_fixture"}
# label -> (kind, method, parameters, gain over the pre-trained model per task, in points)
MODELS = {
    "pre-trained": ("base", None, {}, (0, 0, 0)),
    "math": ("finetune", None, {}, (40, 1, -2)),
    "code": ("finetune", None, {}, (2, 30, -1)),
    "translate": ("finetune", None, {}, (0, 0, 12)),
    "task_arithmetic (lambda=0.3)": ("merge", "task_arithmetic", {"lambda": 0.3}, (12, 9, 4)),
    "task_arithmetic (lambda=1.0)": ("merge", "task_arithmetic", {"lambda": 1.0}, (20, 14, 5)),
    "ties": ("merge", "ties", {"density": 0.5, "lambda": 1.0}, (22, 12, 6)),
    "dare_ties": ("merge", "dare_ties", {"density": 0.7, "lambda": 1.0}, (21, 15, 5.5)),
    "slta (granularity=layer)": ("merge", "slta", {"granularity": "layer"}, (26, 16, 7)),
    "slta (granularity=attn_mlp)": ("merge", "slta", {"granularity": "attn_mlp"}, (30, 18, 8)),
}


def job_spec(label: str, task: str) -> dict:
    kind, method, params, _ = MODELS[label]
    spec = {"label": label, "kind": kind, "model": {"files": {"model.safetensors": label}},
            "task": task, "evaluation": {"limit": None, "seed": 1234},
            "versions": {"harness": "0.1.0", "lm_eval": "0.4.8"}}
    if method:
        spec["merge"] = {"method": method, "parameters": params}
    return spec


def coefficients(label: str) -> list[Coefficient]:
    if MODELS[label][1] != "slta":
        return []
    parts = ["self_attn", "mlp"] if "attn_mlp" in label else [None]
    names = [f"layers.{i}" + (f".{p}" if p else "") for i in range(3) for p in parts]
    return [Coefficient(name, task, round(0.2 + 0.1 * i + 0.05 * t, 3))
            for i, name in enumerate([*names, "non_layer"]) for t, task in enumerate(FINETUNES)]


def job_result(label: str, task: str, experiment: str = EXPERIMENT) -> JobResult:
    kind, _, _, gains = MODELS[label]
    gain = gains[list(TASKS).index(task)]
    scores = []
    for metric, base in TASKS[task].items():
        scale = 1.0 if metric in ("bleu", "chrf") else 0.01
        value = round(base + gain * scale, 6)
        scores.append(Score(task, metric, value, round(0.02 if scale < 1 else 0.8, 6), 20))
    spec = job_spec(label, task)
    timings = {"build": 1.5, "evaluate": 12.25, **({"merge": 3.0 + len(label) / 10}
                                                      if kind == "merge" else {})}
    return JobResult(key=content_key(spec), experiment=experiment, model_label=label, spec=spec,
                     scores=scores, coefficients=coefficients(label), timings=timings,
                     versions={"lm_eval": "0.4.8", f"{task}.version": "1.0"},
                     peak_rss_mb=800.0 + 10 * len(label))


def experiment_config(name: str = EXPERIMENT) -> dict:
    return {"name": name, "base_model": "zoo/base",
            "finetunes": {f: {"model": f"zoo/{f}", "task": t} for f, t in FINETUNES.items()},
            "tasks": list(TASKS)}


def build_store(path: Path, experiment: str = EXPERIMENT, labels=None) -> Path:
    """A result store holding `labels` (default: every model of MODELS) on every task."""
    with ResultStore(path) as store:
        store.ensure_experiment(experiment, experiment_config(experiment))
        for label in labels or MODELS:
            for task in TASKS:
                store.record(job_result(label, task, experiment))
    return path


@pytest.fixture(scope="module")
def store_path(tmp_path_factory) -> Path:
    return build_store(tmp_path_factory.mktemp("reports") / "results.sqlite")


@pytest.fixture()
def store(store_path):
    with ResultStore(store_path) as opened:
        yield opened


@pytest.fixture()
def table(store):
    return comparison_table(store, EXPERIMENT, TableOptions(normalized=True, delta=True))


def assert_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("UPDATE_GOLDEN"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        return
    assert path.exists(), f"{path} is missing; create it with UPDATE_GOLDEN=1 (see this module's docstring)"
    expected = path.read_text(encoding="utf-8")
    assert text == expected, f"{name} differs from its golden file; if intended, UPDATE_GOLDEN=1"


# ------------------------------------------------------------------------- table and renderers


@pytest.mark.parametrize("renderer, golden", [
    (render_markdown, "reports_demo.md"),
    (render_latex, "reports_demo.tex"),
    (render_csv, "reports_demo.csv"),
])
def test_renderers_match_golden_files(table, renderer, golden):
    assert_golden(golden, renderer(table))


def test_json_renderer_marks_best_cells(table):
    from merge_harness.reports.json_table import render_json

    data = json.loads(render_json(table))
    rows = {row["title"]: row for row in data["rows"]}
    assert rows["SLTA (attn/MLP)"]["blocks"]["score"]["Avg."] == {
        "value": pytest.approx(26.3333, abs=1e-3), "stderr": None, "best": True, "lowest": False,
        "significant": False}
    assert rows["TIES"]["blocks"]["score"]["Merge (s)"]["lowest"] is True
    assert rows["TIES"]["blocks"]["score"]["GSM8K (fixture)"]["stderr"] == pytest.approx(2.0)
    assert rows["Pre-trained"]["method"] is None
    assert {c["task"]: c["metric"] for c in data["columns"]}["gsm8k_fixture"] == "exact_match,strict-match"


@pytest.mark.skipif(shutil.which("pdflatex") is None,
                    reason="pdflatex is not installed (apt-get install texlive-latex-base "
                           "texlive-latex-recommended); the LaTeX golden file is still checked")
def test_latex_compiles_with_booktabs(table, tmp_path):
    (tmp_path / "table.tex").write_text(render_latex(table), encoding="utf-8")
    (tmp_path / "doc.tex").write_text("\\documentclass{article}\n\\usepackage{booktabs}\n"
                                      "\\begin{document}\n\\input{table.tex}\n\\end{document}\n")
    run = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "doc.tex"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-3000:]
    assert (tmp_path / "doc.pdf").stat().st_size > 1000


def test_table_rows_are_ordered_and_titled_like_the_paper(table):
    titles = list(table.rows["title"])
    assert titles == ["Pre-trained", "Fine-tuned (math)", "Fine-tuned (code)", "Fine-tuned (translate)",
                      "Task Arithmetic (lambda=0.3)", "Task Arithmetic (lambda=1)", "TIES", "DARE-TIES",
                      "SLTA (layer)", "SLTA (attn/MLP)"]
    assert [c.metric for c in table.columns] == ["exact_match,strict-match", "pass@1", "bleu"]
    score = table.block("score")
    assert score.values.at["math", "GSM8K (fixture)"] == pytest.approx(50.0)  # 0.5 -> 50 points
    assert score.values.at["translate", "WMT22 zh-en (fixture)"] == pytest.approx(20.0)  # BLEU as is
    assert score.best["Avg."] == ["slta (granularity=attn_mlp)"]
    assert score.lowest["Merge (s)"] == ["ties"] and "Merge (s)" not in score.best  # a cost is not a score
    assert "Fine-tuned (math)" not in score.best["GSM8K (fixture)"]  # references do not compete


def test_normalized_and_delta_blocks(table):
    normalized, delta = table.block("normalized"), table.block("delta")
    assert normalized.values.at["math", "GSM8K (fixture)"] == pytest.approx(100.0)
    assert normalized.values.at["ties", "GSM8K (fixture)"] == pytest.approx(64.0)  # 32 / 50
    assert delta.values.loc["task_arithmetic (lambda=1.0)"].abs().max() == 0  # the best TA row
    assert delta.values.at["slta (granularity=attn_mlp)", "GSM8K (fixture)"] == pytest.approx(10.0)


# ---------------------------------------------------- a table checked against hand-computed cells

# label -> (kind, method, GSM8K strict-match, BLEU), in lm-eval's units; a decoy metric of each
# task (flexible-extract, chrF) holds other numbers that must not reach the table
HAND_ROWS = {
    "pre-trained": ("base", None, 0.10, 8.0),
    "math": ("finetune", None, 0.50, 6.0),
    "translate": ("finetune", None, 0.05, 20.0),
    "TA 0.5": ("merge", "task_arithmetic", 0.30, 12.0),
    "TA 1.0": ("merge", "task_arithmetic", 0.35, 14.6),
    "TIES": ("merge", "ties", 0.40, 13.0),
}
HAND_FINETUNES = {"math": "gsm8k_fixture", "translate": "wmt22_zh_en_fixture"}
TITLES = ["Pre-trained", "Fine-tuned (math)", "Fine-tuned (translate)", "TA 0.5", "TA 1.0", "TIES"]
# Worked by hand. Score (points): GSM8K x 100, BLEU as is, Avg. = their mean.
#   Pre-trained 10, 8 -> 9;  math 50, 6 -> 28;  translate 5, 20 -> 12.5
#   TA 0.5 30, 12 -> 21;  TA 1.0 35, 14.6 -> 24.8;  TIES 40, 13 -> 26.5
# Normalized = 100 x score / the fine-tune for the task (math 50 on GSM8K, translate 20 on BLEU):
#   Pre-trained 20, 40 -> 30;  math 100, 30 -> 65;  translate 10, 100 -> 55
#   TA 0.5 60, 60 -> 60;  TA 1.0 70, 73 -> 71.5;  TIES 80, 65 -> 72.5
# Delta = score - the TA row with the best average (TA 1.0: 35, 14.6, 24.8):
#   Pre-trained -25, -6.6, -15.8;  math +15, -8.6, +3.2;  translate -30, +5.4, -12.3
#   TA 0.5 -5, -2.6, -3.8;  TA 1.0 0, 0, 0;  TIES +5, -1.6, +1.7
# Bold = best merge per column: GSM8K TIES, BLEU TA 1.0, Avg. TIES (in every block).
HAND_CELLS = {
    "score": [["10.00", "8.00", "9.00"], ["50.00", "6.00", "28.00"], ["5.00", "20.00", "12.50"],
              ["30.00", "12.00", "21.00"], ["35.00", "**14.60**", "24.80"],
              ["**40.00**", "13.00", "**26.50**"]],
    "normalized": [["20.0", "40.0", "30.0"], ["100.0", "30.0", "65.0"], ["10.0", "100.0", "55.0"],
                   ["60.0", "60.0", "60.0"], ["70.0", "**73.0**", "71.5"],
                   ["**80.0**", "65.0", "**72.5**"]],
    "delta": [["-25.00", "-6.60", "-15.80"], ["+15.00", "-8.60", "+3.20"],
              ["-30.00", "+5.40", "-12.30"], ["-5.00", "-2.60", "-3.80"],
              ["+0.00", "**+0.00**", "+0.00"], ["**+5.00**", "-1.60", "**+1.70**"]],
}


def hand_results():
    import pandas as pd

    records = []
    for label, (kind, method, gsm8k, bleu) in HAND_ROWS.items():
        spec = {"kind": kind, **({"merge": {"method": method, "parameters": {}}} if method else {})}
        for task, metric, value in [
            ("gsm8k_fixture", "exact_match,strict-match", gsm8k),
            ("gsm8k_fixture", "exact_match,flexible-extract", 0.99),
            ("wmt22_zh_en_fixture", "bleu", bleu),
            ("wmt22_zh_en_fixture", "chrf", 99.0),
        ]:
            records.append({"experiment": "hand", "label": label, "method": method, "task": task,
                            "metric": metric, "value": value, "spec_json": json.dumps(spec),
                            "peak_rss_mb": None})
    return pd.DataFrame.from_records(records)


def hand_table():
    options = TableOptions(normalized=True, delta=True, costs=False)
    return build_table(hand_results(), HAND_FINETUNES, options)


def markdown_cells(text: str) -> dict[str, list[list[str]]]:
    """{block title: rows of cells (model column dropped)} of a rendered Markdown table."""
    blocks, title = {}, None
    for line in text.splitlines():
        if line.startswith("### "):
            title = line[4:]
            blocks[title] = []
        elif line.startswith("| ") and not line.startswith("| Model |") and title:
            cells = [c.strip() for c in line.strip("|").split("|")]
            blocks[title].append(cells)
    return blocks


def test_markdown_cells_equal_hand_computed_scores_normalized_and_deltas():
    text = render_markdown(hand_table())
    assert "| Model | GSM8K (fixture) | WMT22 zh-en (fixture) | Avg. |" in text
    blocks = markdown_cells(text)
    assert list(blocks) == ["Score (points)", "Normalized score (% of the fine-tune)",
                            "Δ vs task arithmetic (points)"]
    for (name, cells), rows in zip(HAND_CELLS.items(), blocks.values()):
        assert [row[0] for row in rows] == TITLES, name
        assert [row[1:] for row in rows] == cells, name


def test_csv_cells_equal_hand_computed_numbers():
    import csv
    import io

    rows = {r["model"]: r for r in csv.DictReader(io.StringIO(render_csv(hand_table())))}
    assert list(rows) == TITLES
    columns = ["GSM8K (fixture)", "WMT22 zh-en (fixture)", "Avg."]
    suffixes = {"score": "", "normalized": " (norm. %)", "delta": " (Δ TA)"}
    for name, cells in HAND_CELLS.items():
        for title, row in zip(TITLES, cells):
            for column, cell in zip(columns, row):
                expected = float(cell.strip("*"))
                assert float(rows[title][column + suffixes[name]]) == pytest.approx(expected, abs=1e-9)
    assert rows["TIES"]["best_in"] == ("GSM8K (fixture); Avg.; GSM8K (fixture) (norm. %); "
                                       "Avg. (norm. %); GSM8K (fixture) (Δ TA); Avg. (Δ TA)")
    assert rows["TA 1.0"]["best_in"] == ("WMT22 zh-en (fixture); WMT22 zh-en (fixture) (norm. %); "
                                         "WMT22 zh-en (fixture) (Δ TA)")
    assert rows["Fine-tuned (math)"]["best_in"] == ""  # references do not compete
    assert (rows["TIES"]["kind"], rows["TIES"]["method"]) == ("merge", "ties")


def test_comparison_frame_is_a_dataframe_through_the_python_api(store):
    frame = comparison_frame(store, EXPERIMENT, normalized=True, delta=True)
    assert frame.index.name == "model" and frame.index[-1] == "SLTA (attn/MLP)"
    assert {"kind", "method", "hyper-parameters", "Avg.", "Avg. (norm. %)", "Avg. (Δ TA)",
            "Merge (s)", "Peak RSS (MB)"} <= set(frame.columns)
    assert frame.at["TIES", "hyper-parameters"] == "density=0.5, lambda=1"


def test_primary_metrics_and_scales():
    from merge_harness.reports import metrics

    assert metrics.primary_metric("gsm8k_chat_fixture") == "exact_match,strict-match"
    assert metrics.primary_metric("ropes_fixture", ["exact_match", "f1"]) == "f1"
    assert metrics.primary_metric("my_task", ["acc", "acc_norm"]) == "acc"
    assert metrics.points_per_unit("acc") == 100 and metrics.points_per_unit("bleu") == 1
    assert metrics.method_title("slta", {"granularity": "attn_mlp"}) == "SLTA (attn/MLP)"


# ---------------------------------------------------------------------------- files and plots


def test_write_report_writes_every_format_atomically(store, tmp_path):
    out = tmp_path / "report"
    written = commands.write_report(store, EXPERIMENT, out, "all", normalized=True, delta=True)
    names = {p.relative_to(out).as_posix() for p in written}
    assert {"demo.md", "demo.tex", "demo.csv", "demo.json", "leaderboard.html",
            "plots/demo_scores.png", "plots/demo_scores.svg", "plots/demo_sweep_task_arithmetic_lambda.svg",
            "plots/demo_coefficients_SLTA_attn_MLP.png"} <= names
    assert not list(out.rglob("*.tmp")), "temporary files were left behind"
    assert (out / "plots/demo_scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import xml.etree.ElementTree as ET

    assert ET.parse(out / "plots/demo_scores.svg").getroot().tag.endswith("svg")
    page = (out / "leaderboard.html").read_text(encoding="utf-8")
    assert "Content-Security-Policy" in page and "data:image/svg+xml;base64," in page
    assert "http://" not in page.replace("http://www.w3.org", "") and "https://" not in page


def test_coefficient_heatmap_orders_submodules_by_layer(store):
    names = ["layers.10.mlp", "non_layer", "layers.2.self_attn", "layers.2.mlp", "layers.2", "model"]
    assert sorted(names, key=plots.submodule_order) == [
        "layers.2", "layers.2.self_attn", "layers.2.mlp", "layers.10.mlp", "model", "non_layer"]
    frame = store.results_frame(EXPERIMENT)
    key = frame.loc[frame["label"] == "slta (granularity=attn_mlp)", "key"].iloc[0]
    fig = plots.coefficient_heatmap(store.coefficients_frame(key), "SLTA (attn/MLP)")
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert labels[:3] == ["layers.0.self_attn", "layers.0.mlp", "layers.1.self_attn"]
    assert plots.sweeps(frame) == [("task_arithmetic", "lambda")]


# ------------------------------------------------------------------------------- paper tables


def test_shipped_paper_specs_load_and_leave_unknown_references_empty():
    assert {"slta_llama2", "slta_qwen2_0.5b", "demo_zoo"} <= set(paper.available_specs())
    for name in ("slta_llama2", "slta_qwen2_0.5b"):
        spec = paper.load_spec(name)
        for model_set in spec.model_sets:
            assert "not transcribed" in model_set.reference.source
            cells = [v for row in model_set.reference.values.values() for v in row.values()]
            assert cells and all(v is None for v in cells)  # no invented numbers
    assert [t.name for t in paper.load_spec("slta_qwen2_0.5b").tasks] == [
        "gsm8k", "cosmos_qa", "ropes", "winogrande"]


FIXTURE_SPEC = {  # a paper spec over this module's store (experiment "demo", fixture tasks)
    "name": "fixture_paper", "title": "Fixture paper", "paper": "none (a test)",
    "tasks": [{"name": "gsm8k_fixture", "title": "Math"},
              {"name": "humaneval_sandboxed_fixture", "title": "Code"},
              {"name": "wmt22_zh_en_fixture", "title": "Translate"}],
    "rows": [{"label": "Pre-trained", "kind": "base"},
             {"label": "Math fine-tune", "kind": "finetune", "finetune": "math"},
             {"label": "Task Arithmetic", "kind": "merge", "method": "task_arithmetic"},
             {"label": "TIES", "kind": "merge", "method": "ties"},
             {"label": "SLTA (layer)", "kind": "merge", "method": "slta",
              "parameters": {"granularity": "layer"}}],
    "model_sets": [{"name": "fixture zoo", "base": "zoo/base", "experiment": "demo",
                    "finetunes": {"math": "gsm8k_fixture", "code": "humaneval_sandboxed_fixture",
                                  "translate": "wmt22_zh_en_fixture"}}],
}


def write_spec(path: Path, **model_set) -> Path:
    import yaml

    spec = json.loads(json.dumps(FIXTURE_SPEC))
    spec["model_sets"][0].update(model_set)
    path.write_text(yaml.safe_dump(spec))
    return path


def test_paper_table_measured_vs_reference_with_deltas(store, tmp_path):
    reference = {"source": "a made-up test reference", "values": {"TIES": {"gsm8k_fixture": 30.0}}}
    text = commands.render_paper(store, str(write_spec(tmp_path / "spec.yaml", reference=reference)))
    ties = next(line for line in text.splitlines() if line.startswith("| TIES |"))
    assert ties.split(" | ")[1:4] == ["32.00", "30.00", "+2.00"]
    assert "Task Arithmetic: best of 2 measured rows by average" in text
    assert "a made-up test reference" in text
    assert ties.split(" | ")[5] == "not transcribed"  # Code: no value given


def test_paper_numbers_come_from_a_values_file_next_to_the_spec_and_files_resolve_from_it(
        store, tmp_path, monkeypatch):
    folder = tmp_path / "specs"
    folder.mkdir()
    (folder / "paper_values.yaml").write_text("TIES: {gsm8k_fixture: 31.5, wmt22_zh_en_fixture: 15.0}\n")
    (folder / "run.yaml").write_text("name: demo\n")
    spec = write_spec(folder / "spec.yaml", experiment_file="run.yaml",
                      reference={"source": "Table 9 of a test paper", "values_file": "paper_values.yaml"})
    monkeypatch.chdir(tmp_path / "..")  # anywhere: paths in the spec are relative to it
    text = commands.render_paper(store, str(spec))
    ties = next(line for line in text.splitlines() if line.startswith("| TIES |"))
    assert ties.split(" | ")[1:4] == ["32.00", "31.50", "+0.50"]
    assert "does not exist yet" not in text  # run.yaml is found next to the spec
    bad = write_spec(folder / "bad.yaml", reference={"source": "x", "values_file": "missing.yaml"})
    with pytest.raises(ConfigError, match="missing.yaml"):
        paper.load_spec(bad)


def test_paper_table_says_what_is_not_measured_and_how_to_measure_it(store):
    text = commands.render_paper(store, "slta_llama2")
    assert "values not transcribed" in text and "No reference value has been transcribed" in text
    assert "merge-harness run experiments/slta_llama2_7b.yaml" in text
    assert "merge-harness run experiments/slta_llama2_13b.yaml" in text


@pytest.mark.parametrize("change, message", [
    (lambda s: s["rows"][5].update(method="tiez"), "rows[5].method: unknown method 'tiez' (known: "),
    (lambda s: s["tasks"][0].update(name="gsm9k"), "tasks[0].name: unknown task 'gsm9k' (known: "),
    (lambda s: s.update(colour="red"), "colour"),
    (lambda s: s["model_sets"][0]["finetunes"].update(math="ropes"), "are not columns of the table"),
])
def test_bad_paper_specs_are_clear_errors(tmp_path, change, message):
    import yaml

    spec = yaml.safe_load((paper.SPEC_DIR / "demo_zoo.yaml").read_text())
    change(spec)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError) as error:
        paper.load_spec(path)
    assert message in str(error.value)
    if "known" in message:
        assert "task_arithmetic" in str(error.value) or "gsm8k_fixture" in str(error.value)


def test_unknown_paper_spec_name_lists_the_known_ones():
    with pytest.raises(ConfigError, match="unknown paper spec 'slta_llama3'; known: demo_zoo, slta_llama2"):
        paper.load_spec("slta_llama3")


# ---------------------------------------------------------------------------------- bad input


def test_empty_store_is_a_clear_error(tmp_path):
    with ResultStore(tmp_path / "empty.sqlite") as empty:
        with pytest.raises(StoreError, match=r"empty\.sqlite holds no finished results.*merge-harness run"):
            commands.write_report(empty, None, tmp_path / "out", "md")
        with pytest.raises(StoreError, match="holds no finished results"):
            comparison_table(empty, "demo")


def test_unknown_experiment_names_the_store_and_the_known_ones(store, tmp_path):
    with pytest.raises(ConfigError) as error:
        commands.write_report(store, "demo2", tmp_path, "md")
    assert "'demo2' is not in it" in str(error.value) and str(store.path) in str(error.value)
    assert "experiments with results: demo" in str(error.value)


def test_unsupported_options_are_clear_errors(store, tmp_path):
    with pytest.raises(ConfigError, match="unknown report format"):
        commands.parse_formats("md,pdf")
    with pytest.raises(ConfigError, match="tasks with results: gsm8k_fixture"):
        comparison_table(store, EXPERIMENT, TableOptions(tasks=["ropes"]))
    results = store.results_frame(EXPERIMENT)
    no_ta = results[results["method"].fillna("") != "task_arithmetic"]
    with pytest.raises(ConfigError, match="needs a task_arithmetic row"):
        build_table(no_ta, FINETUNES, TableOptions(delta=True))
    with pytest.raises(ConfigError, match="fine-tune -> task mapping"):
        build_table(results, {}, TableOptions(normalized=True))
    assert issubclass(ConfigError, HarnessError)


def test_several_experiments_share_one_leaderboard_and_partial_paper_tables(tmp_path):
    path = build_store(tmp_path / "two.sqlite", labels=["pre-trained", "math", "ties"])
    build_store(path, experiment="other", labels=["pre-trained", "code", "dare_ties"])
    with ResultStore(path) as two:
        written = commands.write_report(two, None, tmp_path / "out", ["md", "html"], with_plots=False)
        assert sorted(p.name for p in written) == ["demo.md", "leaderboard.html", "other.md"]
        page = (tmp_path / "out" / "leaderboard.html").read_text(encoding="utf-8")
        assert 'data-experiment="other"' in page and 'data-method="dare_ties"' in page
        text = commands.render_paper(two, str(write_spec(tmp_path / "spec.yaml", experiment_file="run.yaml")))
    assert "| TIES | 32.00 |" in text
    assert "Not measured yet in" in text and "SLTA (layer): gsm8k_fixture" in text
    assert f"merge-harness run {tmp_path / 'run.yaml'}" in text and "does not exist yet" in text


def test_the_demo_paper_spec_names_the_demo_experiment_and_its_tasks():
    from merge_harness.zoo.toytasks import LMEVAL_TASKS

    spec = paper.load_spec("demo_zoo")
    (model_set,) = spec.model_sets
    assert model_set.experiment == "demo-toy"  # what `merge-harness demo` names its experiment
    assert {t.name for t in spec.tasks} == set(model_set.finetunes.values()) == set(LMEVAL_TASKS.values())


def test_a_paper_row_prefers_the_held_out_choice_over_the_best_on_test(tmp_path):
    path = build_store(tmp_path / "s.sqlite", labels=["pre-trained", "math", "task_arithmetic (lambda=0.3)",
                                                      "task_arithmetic (lambda=1.0)"])
    with ResultStore(path) as store:
        frame = store.results_frame(EXPERIMENT)
    meta = frame[frame["label"] == "task_arithmetic (lambda=0.3)"].iloc[0]
    spec = json.loads(meta["spec_json"])
    spec["selected"] = {"by": "held-out", "parameter": "lambda", "value": 0.3, "metric": "ll", "score": 0.0}
    frame.loc[frame["label"] == "task_arithmetic (lambda=0.3)", "spec_json"] = json.dumps(spec)
    loaded = paper.load_spec(write_spec(tmp_path / "spec.yaml"))
    cells = paper.fill(loaded, loaded.model_sets[0], frame)
    assert cells.at["Task Arithmetic", ("gsm8k_fixture", "measured")] == pytest.approx(22.0)  # not 30 (best)
    assert any("chosen on held-out train rows" in note for note in cells.attrs["notes"])
