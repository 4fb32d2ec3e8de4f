"""Hyper-parameters are never chosen on test data: a `search:` picks lambda on held-out train rows
inside `run`, reports say how every row's parameters were chosen, `oracle: true` is labelled as
picked on test, and the diagnostics score a searched value on rows disjoint from the ones it was
chosen on."""

from __future__ import annotations

import json

import pytest

from merge_harness.core.errors import ConfigError
from merge_harness.run.experiment import Experiment
from merge_harness.store.database import ResultStore

GRID = [0.0, 0.5, 1.0]


def zoo_experiment(zoo, held_out: dict, methods: list[dict]) -> Experiment:
    return Experiment.model_validate({
        "name": "selection",
        "base_model": str(zoo.base),
        "baselines": False,
        "finetunes": {
            task: {"model": str(zoo.finetunes[task]), "task": zoo.tasks[task],
                   "calibration": str(zoo.train_data[task]), "held_out": str(held_out[task])}
            for task in ("math", "qa")
        },
        "methods": methods,
        "tasks": ["toy_qa"],
        "evaluation": {"limit": 4, "batch_size": 8},
    })


@pytest.fixture(scope="module")
def selection_run(ci_zoo, tmp_path_factory):
    """One run on the ci zoo: a held-out lambda search, and an oracle grid next to it."""
    from merge_harness.run.runner import run_experiment
    from merge_harness.zoo.zoos import held_out_pairs, write_pairs

    zoo, _ = ci_zoo
    root = tmp_path_factory.mktemp("selection")
    held_out = write_pairs(root / "held_out", held_out_pairs(zoo, 8), "held_out")
    methods = [
        {"method": "task_arithmetic", "label": "task_arithmetic (held-out lambda)",
         "search": {"grid": GRID, "num_samples": 8, "max_length": 192}},
        {"method": "task_arithmetic", "label": "ta-oracle", "grid": {"lambda": GRID}, "oracle": True},
    ]
    experiment = zoo_experiment(zoo, held_out, methods)
    store = ResultStore(root / "results.sqlite")
    summary = run_experiment(experiment, store, show_progress=False)
    assert not summary.failed
    yield zoo, held_out, experiment, store
    store.close()


def test_the_searched_lambda_is_what_the_held_out_search_picks(selection_run):
    from merge_harness.selection.answers import DataSettings
    from merge_harness.selection.search import SearchSpec, search_coefficient

    zoo, held_out, _, store = selection_run
    frame = store.results_frame("selection")
    spec = json.loads(frame.loc[frame["label"] == "task_arithmetic (held-out lambda)", "spec_json"].iloc[0])
    selected = spec["selected"]
    finetunes = {t: zoo.finetunes[t] for t in ("math", "qa")}
    independent = search_coefficient(
        zoo.base, finetunes, {t: held_out[t] for t in finetunes}, SearchSpec(grid=tuple(GRID)),
        DataSettings(num_samples=8, seed=0, template="chat", max_length=192),
    )
    assert selected["by"] == "held-out" and selected["parameter"] == "lambda"
    assert selected["value"] == independent.chosen
    assert selected["score"] == pytest.approx(independent.best_score)


def test_the_report_says_how_each_row_was_chosen(selection_run):
    from merge_harness.reports.frame import TableOptions, comparison_table

    _, _, _, store = selection_run
    table = comparison_table(store, "selection", TableOptions(delta=True))
    rows = table.rows.set_index("title")
    searched = rows.loc["Task Arithmetic (held-out lambda)"]
    assert searched["chosen"] == "held-out"
    assert searched["params_text"].endswith("(chosen on held-out train rows)")
    oracle = [title for title in rows.index if title.endswith("(oracle)")]
    assert len(oracle) == 1 and rows.loc[oracle[0], "chosen"] == "oracle"
    assert "picked" not in searched["params_text"] and "best on the test scores" in rows.loc[oracle[0],
                                                                                             "params_text"]
    # the oracle row is a grid point with the best test score, and the only one shown
    results = store.results_frame("selection")
    metric = table.columns[0].metric
    grid = results[results["label"].str.startswith("ta-oracle (") & (results["metric"] == metric)]
    scores = grid.set_index("label")["value"]
    shown = [label for label in table.rows.index if label.startswith("ta-oracle (")]
    assert len(shown) == 1 and scores[shown[0]] == scores.max() and len(scores) == len(GRID)
    # Δ TA is taken against the held-out row, never an oracle pick
    assert any("held-out train rows" in note for note in table.all_notes() if note.startswith("Δ TA"))


def test_selection_on_test_rows_is_refused_before_any_job(ci_zoo, tmp_path):
    from merge_harness.run.experiment import plan_jobs
    from merge_harness.tasks.fixtures import FIXTURES_DIR

    zoo, _ = ci_zoo
    held_out = {task: FIXTURES_DIR / f"toy_{task}.jsonl" for task in ("math", "qa")}
    experiment = zoo_experiment(zoo, held_out, [{"method": "task_arithmetic", "search": {}}])
    with pytest.raises(ConfigError, match="refusing to select on this data"):
        plan_jobs(experiment)


def test_search_and_grid_of_one_parameter_are_refused():
    from merge_harness.run.experiment import MethodRun

    with pytest.raises(ValueError, match="do not also grid it"):
        MethodRun.model_validate({"method": "task_arithmetic", "grid": {"lambda": [0.5]}, "search": {}})
    with pytest.raises(ValueError, match="oracle: true needs a `grid:`"):
        MethodRun.model_validate({"method": "task_arithmetic", "oracle": True})


def test_the_search_recipe_is_in_the_key(ci_zoo, tmp_path):
    from merge_harness.run.experiment import plan_jobs
    from merge_harness.zoo.zoos import held_out_pairs, write_pairs

    zoo, _ = ci_zoo
    held_out = write_pairs(tmp_path, held_out_pairs(zoo, 8), "held_out")

    def key(search: dict) -> str:
        experiment = zoo_experiment(zoo, held_out, [{"method": "task_arithmetic", "search": search}])
        return plan_jobs(experiment)[0].tasks[0].key

    first = key({"grid": GRID})
    assert key({"grid": GRID}) == first
    assert key({"grid": [0.0, 1.0]}) != first
    assert key({"grid": GRID, "metric": "exact_match"}) != first
    held_out["math"].write_text(held_out["math"].read_text().splitlines()[0] + "\n")
    assert key({"grid": GRID}) != first  # the held-out rows by content


def test_diagnostics_select_and_score_on_disjoint_rows(ci_zoo, tmp_path):
    from merge_harness.diagnostics.run_zoo import held_out_data
    from merge_harness.train.finetune import read_pairs
    from merge_harness.zoo.toytasks import read_test_rows

    zoo, _ = ci_zoo
    select, score = held_out_data(zoo, 10, tmp_path)
    for task in zoo.finetunes:
        chosen_on = {e.prompt for e in read_pairs(select[task])}
        scored_on = {e.prompt for e in read_pairs(score[task])}
        trained_on = {e.prompt for e in read_pairs(zoo.train_data[task])}
        assert len(chosen_on) == len(scored_on) == 5
        assert not chosen_on & scored_on and not (chosen_on | scored_on) & trained_on
        assert read_test_rows(task)  # and the test rows stay out of both (train_pairs excludes them)


def test_a_searched_grid_the_method_refuses_is_a_planning_error(ci_zoo, tmp_path):
    from merge_harness.run.experiment import plan_jobs
    from merge_harness.zoo.zoos import held_out_pairs, write_pairs

    zoo, _ = ci_zoo
    held_out = write_pairs(tmp_path, held_out_pairs(zoo, 8), "held_out")
    experiment = zoo_experiment(zoo, held_out, [{"method": "ties", "search": {"parameter": "density"}}])
    with pytest.raises(ConfigError, match=r"methods\[0\]\.search\.grid: grid: density = 0 is not valid"):
        plan_jobs(experiment)  # the default grid starts at 0, which density refuses
