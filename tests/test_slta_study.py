"""The SLTA study's parts (issue 18): its tasks, SLTA's scale and residual, statistics reuse within a
search, replicated experiments (`seeds:`), the calibration-template ablation, the study zoo."""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from merge_harness.core.errors import ConfigError
from merge_harness.merge.data_driven import merge_calibrated
from merge_harness.merges.model_level import statistics_reuse
from merge_harness.merges.slta import normal_equations
from merge_harness.zoo import studytasks, toytasks
from tests.calibrated_zoo import make_zoo, merge_config
from tests.conftest import state_of

# ------------------------------------------------------------------------------- the tasks


def test_study_fixtures_are_the_generated_rows():
    for task in studytasks.TASKS:
        rows = studytasks.read_test_rows(task)
        assert rows == studytasks.fixture_rows(task), (
            f"{studytasks.fixture_path(task)} is stale: run `python -m merge_harness.zoo.studytasks`")
        assert len(rows) == studytasks.STUDY_TEST_ROWS >= 100


@pytest.mark.parametrize("task", studytasks.TASKS)
def test_train_rows_never_show_a_test_prompt_of_either_suite(task):
    tests = {studytasks.as_pair(task, row)["prompt"] for row in studytasks.read_test_rows(task)}
    tests |= {toytasks.as_pair(task, row)["prompt"] for row in toytasks.read_test_rows(task)}
    drawn = studytasks.train_pairs(task, 400, seed=0)
    assert len({p["prompt"] for p in drawn}) == 400
    assert not tests & {p["prompt"] for p in drawn}


def test_code_rows_are_instructions_answered_with_the_whole_function():
    row = studytasks.fixture_rows("code")[0]
    pair = studytasks.as_pair("code", row)
    assert pair["prompt"].startswith("Write a Python function ") and " that returns " in pair["prompt"]
    assert pair["response"].startswith(f"def {row['entry_point']}(")
    assert row["prompt"] == ""  # the sandbox runs the completion alone against the tests


def test_study_code_scores_the_function_by_running_its_tests():
    from merge_harness.tasks.study.utils import instruction_pass_at_1

    row = studytasks.fixture_rows("code")[0]
    solution = row["canonical_solution"]
    assert instruction_pass_at_1(row, [solution])["pass@1"] == 1.0
    assert instruction_pass_at_1(row, [f"```python\n{solution}```\nThis adds them."])["pass@1"] == 1.0
    assert instruction_pass_at_1(row, ["import sys\nsys.exit(0)\n"])["pass@1"] == 0.0
    wrong = solution.replace("return ", "return 1 + ")
    assert instruction_pass_at_1(row, [wrong])["pass@1"] == 0.0


# ---------------------------------------------------------------------- SLTA: scale, residual


def test_residual_of_the_normal_equations_is_the_sum_of_squares():
    g = torch.Generator().manual_seed(0)
    deltas = torch.randn(3, 7, 5, generator=g, dtype=torch.float64)  # (T, tokens, d_out), task 1
    equations = normal_equations(deltas, task=1)
    for a in (torch.zeros(3), torch.tensor([0.3, -1.2, 0.7]), torch.ones(3)):
        a = a.double()
        direct = ((torch.tensordot(a, deltas, dims=1) - deltas[1]) ** 2).sum()
        assert equations.residual(a.double()) == pytest.approx(float(direct), rel=1e-10)
    assert equations.residual(torch.zeros(3)) == pytest.approx(float((deltas[1] ** 2).sum()))


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return make_zoo(tmp_path_factory.mktemp("study_zoo"))


def coefficients(outcome) -> dict[tuple[str, str], float]:
    return {(c.submodule, c.task): c.value for c in outcome.coefficients}


def test_scale_multiplies_every_solved_coefficient_and_the_merge(zoo):
    one = merge_calibrated(merge_config(zoo, granularity="layer", num_samples=6))
    two = merge_calibrated(merge_config(zoo, granularity="layer", num_samples=6, scale=2.0))
    for key, value in coefficients(one).items():
        assert coefficients(two)[key] == pytest.approx(2 * value, rel=1e-12)
    name = "model.layers.0.self_attn.q_proj.weight"
    theta_0 = state_of(zoo["base"])[name]
    doubled = 2 * (one.state[name] - theta_0)
    torch.testing.assert_close(two.state[name] - theta_0, doubled, rtol=1e-5, atol=1e-6)


def test_a_search_reuses_the_calibration_statistics_and_nothing_outside_it(zoo):
    with statistics_reuse():
        first = merge_calibrated(merge_config(zoo, granularity="attn_mlp", num_samples=6, scale=1.0))
        again = merge_calibrated(merge_config(zoo, granularity="attn_mlp", num_samples=6, scale=3.0))
        other = merge_calibrated(merge_config(zoo, granularity="attn_mlp", num_samples=5))
    assert set(first.forward_passes.values()) == {1.0}
    assert again.forward_passes == {}  # the equations came from the first merge
    assert set(other.forward_passes.values()) == {1.0}  # other calibration rows: computed
    for key, value in coefficients(first).items():
        assert coefficients(again)[key] == pytest.approx(3 * value, rel=1e-12)
    outside = merge_calibrated(merge_config(zoo, granularity="attn_mlp", num_samples=6))
    assert set(outside.forward_passes.values()) == {1.0}
    assert coefficients(outside) == pytest.approx(coefficients(first))


def test_a_scale_search_job_calibrates_once_for_its_search_and_its_final_merge(zoo, monkeypatch):
    """The job's grid merges and the merge at the chosen c share one set of normal equations."""
    from merge_harness.merges import slta
    from merge_harness.run.experiment import Experiment, plan_jobs
    from merge_harness.run.worker import run_model_job

    collected = []
    original = slta.collect_equations
    monkeypatch.setattr(slta, "collect_equations", lambda *a: collected.append(1) or original(*a))
    tasks = ("math", "qa", "translate")
    experiment = Experiment.model_validate({
        "name": "scale", "base_model": str(zoo["base"]), "tasks": ["study_math"], "baselines": False,
        "finetunes": {t: {"model": str(zoo[t]), "held_out": str(zoo[f"{t}.jsonl"]),
                          "calibration": {"source": str(zoo[f"{t}.jsonl"]), "template": "plain",
                                          "num_samples": 6}} for t in tasks},
        "methods": [{"method": "slta", "parameters": {"granularity": "layer"},
                     "search": {"parameter": "scale", "grid": [0.5, 1.0, 2.0], "num_samples": 4,
                                "max_length": 32}}],
    })
    [job] = plan_jobs(experiment, identify=False)
    run_model_job(job, [], experiment.name, lambda result: None)
    assert collected == [1]
    with statistics_reuse():  # and a block inside another shares the outer one's statistics
        with statistics_reuse():
            merge_calibrated(merge_config(zoo, granularity="layer", num_samples=6))
        again = merge_calibrated(merge_config(zoo, granularity="layer", num_samples=6))
    assert again.forward_passes == {}


def test_the_disentanglement_gap_is_paired_by_seed_not_by_cell():
    """Per seed the mean gap over pairs, then the t interval over the seeds (n = 3, t = 4.30)."""
    from merge_harness.diagnostics.slta_study import disentanglement_text

    records = []
    gaps = {0: (0.02, 0.01), 1: (0.025, 0.015), 2: (0.015, 0.005)}  # seed -> gap of pair a, pair b
    for seed, (gap_a, gap_b) in gaps.items():
        for pair, gap in (("a+b", gap_a), ("a+c", gap_b)):
            records += [{"variant": "attn_only", "seed": seed, "pair": pair, "xi": 0.05, "relative": 0.1},
                        {"variant": "full", "seed": seed, "pair": pair, "xi": 0.05 + gap, "relative": 0.1}]
    text = disentanglement_text(pd.DataFrame(records), (0.0, 1.0))
    per_seed = [0.015, 0.02, 0.01]  # the mean over the two pairs
    half = 4.302653 * np.std(per_seed, ddof=1) / np.sqrt(3)
    assert f"paired over the 3 seeds: +0.0150 ± {half:.4f} (95% t interval) — excludes 0" in text
    assert "| a+b | 0.0700 ± 0.0124 | 0.0500 ± 0.0000 | +0.0200 ± 0.0124 |" in text
    assert "paired over the 3 seeds: +0.0000 ± 0.0000 (95% t interval) — includes 0" in text  # relative


# ------------------------------------------------------------------- replicated experiments


def write_replicated(root, seeds="[0, 1]", name="rep"):
    for seed in (0, 1):
        for part in ("base", "ft"):
            (root / f"zoo{seed}" / part).mkdir(parents=True, exist_ok=True)
        (root / f"zoo{seed}" / "math_held_out.jsonl").write_text('{"prompt": "1 + 1?", "response": "2"}\n')
    path = root / "exp" / "e.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(textwrap.dedent(f"""\
        name: {name}
        seeds: {seeds}
        base_model: ../zoo{{seed}}/base
        finetunes:
          math:
            model: ../zoo{{seed}}/ft
            calibration:
              source: ../zoo{{seed}}/math.jsonl
            held_out: ../zoo{{seed}}/math_held_out.jsonl
        methods:
          - method: slta
            label: SLTA (layer), plain calibration
            calibration_template: plain
        tasks: [toy_math]
    """))
    return path


def test_seeds_make_one_experiment_per_seed_with_its_paths(tmp_path):
    from merge_harness.run.experiment import load_experiments

    experiments = load_experiments(write_replicated(tmp_path))
    assert [e.name for e in experiments] == ["rep-seed0", "rep-seed1"]
    assert [e.seed for e in experiments] == [0, 1]
    assert all(e.seeds is None for e in experiments)
    for seed, experiment in enumerate(experiments):
        assert Path(experiment.base_model).resolve() == (tmp_path / f"zoo{seed}" / "base").resolve()
        model = Path(experiment.finetunes["math"].model)
        assert model.resolve() == (tmp_path / f"zoo{seed}" / "ft").resolve()
        assert experiment.finetunes["math"].calibration.source.endswith(f"zoo{seed}/math.jsonl")
        held_out = Path(experiment.finetunes["math"].held_out)  # relative to the file, as the rest
        assert held_out.resolve() == (tmp_path / f"zoo{seed}" / "math_held_out.jsonl").resolve()


def test_one_experiment_readers_and_repeated_seeds_are_refused(tmp_path):
    from merge_harness.run.experiment import load_experiment, load_experiments

    with pytest.raises(ConfigError, match="seeds: makes 2 experiments"):
        load_experiment(write_replicated(tmp_path))
    with pytest.raises(ConfigError, match="repeats a seed"):
        load_experiments(write_replicated(tmp_path, seeds="[1, 1]"))
    assert load_experiment(write_replicated(tmp_path, seeds="[1]")).name == "rep-seed1"


def test_calibration_template_replaces_the_fine_tunes_template(tmp_path):
    from merge_harness.run.experiment import load_experiment, method_configs

    experiment = load_experiment(write_replicated(tmp_path, seeds="[0]"))
    [(label, config)] = method_configs(experiment)
    assert config.models[0].calibration.template == "plain"
    plain = experiment.methods[0].model_copy(update={"calibration_template": None})
    [(_, default)] = method_configs(experiment.model_copy(update={"methods": [plain]}))
    assert default.models[0].calibration.template is None  # the one recorded in training


def test_run_with_a_seed_no_replicate_has_is_a_one_line_error(tmp_path):
    from tests.test_bad_input import cli, one_error_line

    result = cli("run", str(write_replicated(tmp_path)), "--seed", "7", "--dry-run")
    assert result.returncode == 2
    assert one_error_line(result.stderr).endswith("e.yaml: --seed [7]: no replicate has that seed")


# ------------------------------------------------------------------------------ the study zoo


def test_study_zoo_on_the_ci_base_resumes_a_killed_build(tmp_path):
    from merge_harness.zoo.study import build_study_zoos, held_out_path

    zoos = build_study_zoos(tmp_path / "links", tmp_path / "cache", ("full",), (0,), size="ci",
                            show_progress=False)
    zoo = zoos["full-seed0"]
    assert (tmp_path / "links" / "full-seed0").resolve() == zoo.root.resolve()
    assert zoo.tasks == studytasks.LMEVAL_TASKS and zoo.suite == "study"
    spec = json.loads((zoo.root / "zoo.json").read_text())["spec"]
    assert spec["suite"] == "study" and spec["data_seed"] == 0
    for task in studytasks.TASKS:
        rows = [json.loads(line) for line in held_out_path(zoo, task).read_text().splitlines()]
        train = [json.loads(line) for line in zoo.train_data[task].read_text().splitlines()]
        assert len(rows) == 64 and not {r["prompt"] for r in rows} & {r["prompt"] for r in train}
    stamps = {task: (zoo.finetunes[task] / "model.safetensors").stat().st_mtime_ns for task in zoo.finetunes}
    before = (zoo.finetunes["code"] / "model.safetensors").read_bytes()
    (zoo.root / "zoo.json").unlink()  # as if killed before the last step
    shutil.rmtree(zoo.finetunes["code"])
    again = build_study_zoos(tmp_path / "links", tmp_path / "cache", ("full",), (0,), size="ci",
                             show_progress=False)["full-seed0"]
    assert again.root == zoo.root
    for task in ("math", "translate"):  # kept, not retrained
        assert (zoo.finetunes[task] / "model.safetensors").stat().st_mtime_ns == stamps[task]
    assert (zoo.finetunes["code"] / "model.safetensors").read_bytes() == before  # same seed, same weights


def test_seeds_share_the_rows_and_differ_in_training(tmp_path):
    from merge_harness.zoo.study import build_study_zoos

    zoos = build_study_zoos(tmp_path / "links", tmp_path / "cache", ("full",), (0, 1), size="ci",
                            show_progress=False)
    first, second = zoos["full-seed0"], zoos["full-seed1"]
    assert first.train_data["math"].read_text() == second.train_data["math"].read_text()
    a = (first.finetunes["math"] / "model.safetensors").read_bytes()
    b = (second.finetunes["math"] / "model.safetensors").read_bytes()
    assert a != b
    assert np.isfinite(json.loads((second.root / "zoo.json").read_text())["losses"]["math"]).all()


# ------------------------------------------------------- the study itself, reduced, on the ci zoo


@pytest.fixture(scope="module")
def reduced_study(tmp_path_factory):
    """experiments/slta_study.yaml as committed, on the ci-size study zoo (two seeds), with 4 test
    rows per task: run every replicate, then the study report."""
    import yaml

    from merge_harness.diagnostics.slta_study import write_study_report
    from merge_harness.io.models import torch_threads
    from merge_harness.run.experiment import load_experiments
    from merge_harness.run.runner import run_experiment
    from merge_harness.store.database import ResultStore
    from merge_harness.zoo.study import build_study_zoos

    root = tmp_path_factory.mktemp("reduced_study")
    links = root / "study-zoo"
    with torch_threads(1):
        build_study_zoos(links, root / "cache", seeds=(0, 1), size="ci", show_progress=False)
    text = (Path(__file__).parents[1] / "experiments" / "slta_study.yaml").read_text()
    config = yaml.safe_load(text.replace("../study-zoo/", f"{links}/"))
    config.update(seeds=[0, 1], store=str(root / "study.sqlite"))
    config["evaluation"]["limit"] = 4
    path = root / "slta_study.yaml"
    path.write_text(yaml.safe_dump(config))
    experiments = load_experiments(path)
    with ResultStore(root / "study.sqlite") as store, torch_threads(1):
        summaries = [run_experiment(e, store, show_progress=False) for e in experiments]
        files = write_study_report(store, "slta-study", links, root / "report")
    return experiments, summaries, files, root


@pytest.mark.slow
def test_the_committed_study_plans_runs_and_renders_on_the_ci_zoo(reduced_study):
    experiments, summaries, files, root = reduced_study
    assert [e.name for e in experiments] == ["slta-study-seed0", "slta-study-seed1"]
    assert all(not s.failed for s in summaries), [s.failed for s in summaries]
    names = {p.name for p in files}
    assert {"table.md", "table.csv", "paired.md", "scores.png", "residuals.md",
            "disentanglement.md"} <= names
    assert any(n.startswith("coefficients_slta_layer") for n in names)
    table = (root / "report" / "table.md").read_text()
    for row in ("TA (held-out lambda)", "TA oracle", "SLTA (layer), held-out scale c",
                "SLTA (layer), plain calibration", "SLTA (layer), N=64", "regmean", "fisher"):
        assert f"| {row} |" in table, row
    assert "±" in table
    paired = (root / "report" / "paired.md").read_text()
    assert "| SLTA (attn/MLP) |" in paired and "p = " in paired
    assert paired.count("### minus ") == 2 and "### minus TA (held-out lambda, exact match)" in paired
    residuals = (root / "report" / "residuals.md").read_text()
    assert "layer: TA (held-out lambda)" in residuals and "attn_mlp: SLTA (attn/MLP)" in residuals
    assert "attn_mlp: TA (held-out lambda, exact match)" in residuals
    assert "full - attn_only, the mean over pairs paired over the 2 seeds" in (
        root / "report" / "disentanglement.md").read_text()
