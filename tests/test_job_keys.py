"""Job keys: everything that determines a result changes the key; nothing else does.

A finished key is never recomputed, so a key that misses an input silently serves a stale result.
Each input below is changed alone: the weight bytes (same file names), the method and each of
its parameters, the calibration data, the task definition, each evaluation setting and the
lm-eval version. Renaming or moving the experiment, reordering YAML keys and touching weight
files leave every key as it was.
"""

from __future__ import annotations

import os
import shutil
import typing
from pathlib import Path

import pytest

import merge_harness
import merge_harness.run.experiment
from merge_harness.evaluate.evaluator import EvalSettings, TaskCatalog
from merge_harness.merge.methods import get_method
from merge_harness.run.experiment import Experiment, TaskRun, load_experiment, plan_jobs
from merge_harness.store.database import ResultStore
from merge_harness.tasks import TASKS_DIR
from tests.calibrated_zoo import make_zoo

TASKS = ["gsm8k_fixture", "cosmos_qa_fixture"]
METHODS = {  # label -> (method, parameters); labels stay fixed while a method or parameter changes
    "TA": ("task_arithmetic", {"lambda": 0.5}),
    "TIES": ("ties", {"density": 0.5}),
    "SLTA": ("slta", {"granularity": "layer", "num_samples": 4}),
}
BASELINES = {"pre-trained", "math", "qa"}


def experiment_yaml(methods: dict[str, tuple[str, dict]] = METHODS, reordered: bool = False) -> str:
    """The experiment, with paths relative to its file; `reordered`: every mapping's keys reversed."""

    def mapping(pairs: dict) -> str:
        items = list(pairs.items())[::-1] if reordered else pairs.items()
        return "{" + ", ".join(f"{k}: {v}" for k, v in items) + "}"

    finetunes = {
        name: mapping({"model": name, "task": task,
                       "calibration": mapping({"source": f"{name}.jsonl", "template": "plain"})})
        for name, task in (("math", "gsm8k_fixture"), ("qa", "cosmos_qa_fixture"))
    }
    runs = [
        mapping({"label": label, "method": method, "parameters": mapping(params)})
        for label, (method, params) in methods.items()
    ]
    sections = {
        "name": "keys",
        "base_model": "base",
        "finetunes": "\n" + "".join(f"  {name}: {value}\n" for name, value in finetunes.items()),
        "methods": "\n" + "".join(f"  - {run}\n" for run in runs),
        "tasks": "[" + ", ".join(TASKS) + "]",
        "evaluation": mapping({"limit": 2, "batch_size": 1}),
    }
    items = list(sections.items())[::-1] if reordered else sections.items()
    return "".join(f"{k}: {v.rstrip()}\n" for k, v in items)


@pytest.fixture(scope="module")
def zoo_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("key_zoo")
    make_zoo(root, tasks=("math", "qa"), rows=6)
    return root


@pytest.fixture
def world(zoo_dir, tmp_path) -> Path:
    """A fresh copy of the zoo with the experiment file beside it: safe to edit."""
    root = tmp_path / "world"
    shutil.copytree(zoo_dir, root)
    (root / "experiment.yaml").write_text(experiment_yaml())
    return root


def keys(experiment: Experiment | Path, store: ResultStore | None = None) -> dict[tuple[str, str], str]:
    if isinstance(experiment, Path):
        experiment = load_experiment(experiment)
    return {(job.label, task.task): task.key for job in plan_jobs(experiment, store) for task in job.tasks}


def changed(before: dict, after: dict) -> set[str]:
    """The labels of the jobs whose key changed (every task of a label must agree)."""
    assert before.keys() == after.keys()
    labels = {label for label, _ in before}
    moved = {label for label in labels if all(before[label, t] != after[label, t] for t in TASKS)}
    kept = {label for label in labels if all(before[label, t] == after[label, t] for t in TASKS)}
    assert moved | kept == labels, "a change moved some of a model's task keys but not all"
    return moved


# ------------------------------------------------------------------------------ what changes it


@pytest.mark.parametrize("cached", [False, True], ids=["no store", "store hash cache"])
def test_weight_bytes_under_the_same_file_names_change_the_key(world, tmp_path, cached):
    from safetensors.torch import load_file, save_file

    with ResultStore(tmp_path / "s.sqlite") as store:
        store = store if cached else None
        before = keys(world / "experiment.yaml", store)
        weights = world / "qa" / "model.safetensors"
        state = load_file(weights)
        name = next(iter(state))
        state[name] = state[name] + 1e-3  # same names, shapes and file size: only the bytes differ
        size = weights.stat().st_size
        save_file(state, weights, metadata={"format": "pt"})
        assert weights.stat().st_size == size
        after = keys(world / "experiment.yaml", store)
    assert changed(before, after) == {"qa", *METHODS}


def other_value(model: type, name: str, key: str, current: typing.Any, data: dict) -> typing.Any:
    """A value of field `name` (written `key`) unlike `current` that `model` accepts with `data`."""
    annotation = model.model_fields[name].annotation
    literals = [v for arg in [annotation, *typing.get_args(annotation)]
                if typing.get_origin(arg) is typing.Literal for v in typing.get_args(arg)]
    by_type = {
        bool: lambda: [not current],
        int: lambda: [current + 1, 2],
        float: lambda: [current / 2 + 0.1, 0.3],
        str: lambda: ["auto", f"{current}-other"],
        dict: lambda: [{**current, "max_gen_toks": 7}],
    }
    anything = lambda: [1, 0.5, True, "auto", {"max_gen_toks": 7}]  # noqa: E731 (unset: None)
    candidates = literals + by_type.get(type(current), anything)()
    for candidate in candidates:
        if candidate == current:
            continue
        try:
            model.model_validate({**data, key: candidate})
        except Exception:
            continue
        return candidate
    pytest.fail(f"no alternative value for {model.__name__}.{name}; add a candidate in other_value")


def field_variants(model: type, data: dict) -> list[tuple[str, typing.Any]]:
    """(field key as written in YAML, another valid value) for every field of a pydantic model;
    `data` may hold keys of other models (a per-model parameter given once for all models)."""
    names = {info.alias or name: name for name, info in model.model_fields.items()}
    data = {k: v for k, v in data.items() if k in names}
    defaults = model.model_validate(data)
    return [(key, other_value(model, name, key, data.get(key, getattr(defaults, name)), data))
            for key, name in names.items()]


def method_variants(method: str, params: dict) -> list[tuple[str, typing.Any]]:
    """Every method-level and per-model parameter of `method`, each with another valid value."""
    spec = get_method(method)
    return field_variants(spec.params, params) + field_variants(spec.model_params, params)


def with_method(world: Path, label: str, method: str, params: dict) -> Path:
    path = world / "experiment.yaml"
    path.write_text(experiment_yaml({**METHODS, label: (method, params)}))
    return path


@pytest.mark.parametrize("label", list(METHODS))
def test_the_method_and_each_of_its_parameters_change_that_merge_key(world, label):
    before = keys(world / "experiment.yaml")
    method, params = METHODS[label]
    variants = method_variants(method, params)
    assert {key for key, _ in variants} >= set(params), f"{method}: every given parameter is varied"
    for key, value in variants:
        after = keys(with_method(world, label, method, {**params, key: value}))
        assert changed(before, after) == {label}, f"{method}: {key} -> {value!r}"
    # another method with the same parameters, under the same label
    other = {"task_arithmetic": "ties", "ties": "dare_ties", "slta": "regmean"}[method]
    shared = {k: v for k, v in params.items() if k in {key for key, _ in method_variants(other, {})}}
    assert shared, other
    same_params = keys(with_method(world, label, method, shared))
    assert changed(same_params, keys(with_method(world, label, other, shared))) == {label}


def test_per_model_parameters_and_merge_seed_change_the_merge_keys(world):
    experiment = load_experiment(world / "experiment.yaml")
    before = keys(experiment)
    ties = experiment.methods[1].model_copy(update={"model_parameters": {"qa": {"density": 0.7}}})
    methods = [experiment.methods[0], ties, experiment.methods[2]]
    assert changed(before, keys(experiment.model_copy(update={"methods": methods}))) == {"TIES"}
    assert changed(before, keys(experiment.model_copy(update={"seed": 1}))) == set(METHODS)
    dtype = experiment.methods[0].model_copy(update={"dtype": "bfloat16"})
    methods = [dtype, *experiment.methods[1:]]
    assert changed(before, keys(experiment.model_copy(update={"methods": methods}))) == {"TA"}


def test_calibration_file_content_changes_the_merge_keys(world):
    before = keys(world / "experiment.yaml")
    data = world / "qa.jsonl"
    data.write_text(data.read_text().replace("how many", "how few", 1))
    # SLTA's result depends on it; task arithmetic and TIES read no calibration data
    assert changed(before, keys(world / "experiment.yaml")) == {"SLTA"}
    (world / "moved.jsonl").write_text(data.read_text())  # the same content elsewhere: same key
    path = world / "experiment.yaml"
    path.write_text(path.read_text().replace("source: qa.jsonl", "source: moved.jsonl"))
    assert changed(before, keys(path)) == {"SLTA"}
    data.write_text(data.read_text().replace("how few", "how many", 1))
    path.write_text(path.read_text().replace("source: moved.jsonl", "source: qa.jsonl"))
    assert keys(path) == before


def lm_eval_task_root(tmp_path: Path, name: str, edit=None) -> TaskCatalog:
    """A copy of our gsm8k and cosmos_qa task folders under `tmp_path/name`, optionally edited."""
    root = tmp_path / name
    for folder in ("gsm8k", "cosmos_qa"):
        shutil.copytree(TASKS_DIR / folder, root / folder, ignore=shutil.ignore_patterns("__pycache__"))
    if edit:
        edit(root / "cosmos_qa")
    return TaskCatalog(include_paths=[root], include_defaults=False)


def replace_in(file: str, old: str, new: str):
    def edit(folder: Path) -> None:
        path = folder / file
        assert old in path.read_text()
        path.write_text(path.read_text().replace(old, new))
    return edit


def reorder_yaml(folder: Path) -> None:
    import yaml

    path = folder / "cosmos_qa.yaml"
    text = path.read_text().replace("!function utils.doc_to_choice", "__FN__")
    data = yaml.safe_load(text)
    reordered = yaml.safe_dump(dict(reversed(list(data.items()))), sort_keys=False)
    assert reordered.count("__FN__") == 1 and reordered != text
    path.write_text(reordered.replace("__FN__", "!function utils.doc_to_choice"))


TASK_EDITS = {
    "prompt": replace_in("cosmos_qa.yaml", "Question: {{question}}", "Q: {{question}}"),
    "version": replace_in("cosmos_qa.yaml", "version: 1.0", "version: 2.0"),
    "fixture yaml": replace_in("cosmos_qa_fixture.yaml", "fewshot_split: validation", "fewshot_split: null"),
    "utils.py": replace_in("utils.py", "def doc_to_choice", "# edited\ndef doc_to_choice"),
}


@pytest.mark.parametrize("edit", list(TASK_EDITS))
def test_the_task_definition_changes_that_task_key(world, tmp_path, monkeypatch, edit):
    catalog = {}
    monkeypatch.setattr("merge_harness.evaluate.evaluator.catalog_for", lambda names: catalog["now"])
    catalog["now"] = lm_eval_task_root(tmp_path, "original")
    experiment = load_experiment(world / "experiment.yaml")
    before = keys(experiment)
    catalog["now"] = lm_eval_task_root(tmp_path, "elsewhere", reorder_yaml)  # another checkout
    assert keys(experiment) == before
    catalog["now"] = lm_eval_task_root(tmp_path, "edited", TASK_EDITS[edit])
    after = keys(experiment)
    for (label, task), key in before.items():
        assert (after[label, task] != key) == (task == "cosmos_qa_fixture"), (label, task)


def test_our_task_keys_hold_the_declared_version(world):
    [job, *_] = plan_jobs(load_experiment(world / "experiment.yaml"))
    definition = {t.task: t.spec["task_definition"] for t in job.tasks}
    assert definition["gsm8k_fixture"]["version"] == "3.0"
    assert definition["cosmos_qa_fixture"]["version"] == "1.0"


def test_each_evaluation_setting_changes_every_key(world):
    experiment = load_experiment(world / "experiment.yaml")
    before = keys(experiment)
    data = experiment.evaluation.model_dump()
    variants = field_variants(EvalSettings, data)
    assert {key for key, _ in variants} == set(EvalSettings.model_fields)
    for key, value in variants:
        settings = EvalSettings.model_validate({**data, key: value})
        after = keys(experiment.model_copy(update={"evaluation": settings}))
        assert changed(before, after) == BASELINES | set(METHODS), f"evaluation.{key} -> {value!r}"


def test_per_task_overrides_change_that_task_key_only(world):
    experiment = load_experiment(world / "experiment.yaml")
    before = keys(experiment)
    for override in ({"limit": 3}, {"num_fewshot": 1}):
        tasks = ["gsm8k_fixture", TaskRun(name="cosmos_qa_fixture", **override)]
        after = keys(experiment.model_copy(update={"tasks": tasks}))
        for (label, task), key in before.items():
            assert (after[label, task] != key) == (task == "cosmos_qa_fixture"), override


def test_the_lm_eval_and_harness_versions_change_every_key(world, monkeypatch):
    experiment = load_experiment(world / "experiment.yaml")
    before = keys(experiment)
    real = merge_harness.run.experiment.version
    with monkeypatch.context() as patch:
        patch.setattr(merge_harness.run.experiment, "version",
                      lambda d: "99.0" if d == "lm_eval" else real(d))
        assert changed(before, keys(experiment)) == BASELINES | set(METHODS)
    with monkeypatch.context() as patch:
        patch.setattr(merge_harness, "__version__", "99.0")
        assert changed(before, keys(experiment)) == BASELINES | set(METHODS)
    assert keys(experiment) == before


# ------------------------------------------------------------------------ what does not change it


def test_moving_renaming_and_reordering_the_experiment_keep_every_key(world, tmp_path):
    before = keys(world / "experiment.yaml")
    renamed = world / "renamed.yaml"
    renamed.write_text(experiment_yaml(reordered=True))
    assert keys(renamed) == before
    moved = tmp_path / "elsewhere" / "deeper"
    shutil.copytree(world, moved)  # the experiment and its models, by relative paths
    assert keys(moved / "experiment.yaml") == before


def test_touching_weight_and_calibration_files_keeps_every_key(world, tmp_path):
    with ResultStore(tmp_path / "s.sqlite") as store:
        before = keys(world / "experiment.yaml", store)
        for path in [*world.glob("*/*.safetensors"), *world.glob("*.jsonl")]:
            stat = path.stat()
            os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
        assert keys(world / "experiment.yaml", store) == before
        assert keys(world / "experiment.yaml") == before  # and without the store's hash cache


def test_the_keys_are_distinct_across_models_and_tasks(world):
    before = keys(world / "experiment.yaml")
    assert len(set(before.values())) == len(before) == 2 * (len(BASELINES) + len(METHODS))
