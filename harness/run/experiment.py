"""Experiments: a YAML naming models, methods with parameter grids, and tasks -> a list of jobs.

    name: demo
    base_model: ./zoo/base
    finetunes:                      # name -> model (+ the task it was tuned for, its calibration data)
      math: {model: ./zoo/math, task: gsm8k_fixture, calibration: ./zoo/math_train.jsonl}
      qa: {model: ./zoo/qa, calibration: {source: ./zoo/qa_train.jsonl, template: chat, num_samples: 16}}
      code: {model: ./zoo/code, task: humaneval_sandboxed_fixture}
    methods:
      - method: task_arithmetic
        grid: {lambda: [0.3, 0.5, 1.0]}      # one merge per value (cartesian product over keys)
      - method: ties
        parameters: {density: 0.5}
    tasks: [gsm8k_fixture, {name: ropes_fixture, limit: 20}]
    evaluation: {batch_size: 4, limit: 50}

Each (model, task) pair is a job whose key is the content hash of everything that determines its
result (model file hashes or HF revision, method + parameters, calibration data, task + eval
settings, lm-eval and harness versions), so a finished job is never recomputed.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

import merge_harness
from merge_harness.core.config_files import (
    format_loc,
    load_config_file,
    locate,
    output_relative_to,
    relative_to,
)
from merge_harness.core.errors import ConfigError, HarnessError
from merge_harness.evaluate.evaluator import EvalSettings
from merge_harness.io.models import resolve_model
from merge_harness.merge.config import (
    CalibrationSource,
    MergeConfig,
    Scalar,
    Setting,
    calibration_relative_to,
)
from merge_harness.merge.parameters import ParameterError
from merge_harness.run.job_identity import (
    calibration_identity,
    merge_identity,
    model_identity,
    plain_settings,
)
from merge_harness.selection.grid import Chosen, HeldOutSearch, check_grid
from merge_harness.store.database import ResultStore, content_key

STRICT = ConfigDict(extra="forbid")


class Finetune(BaseModel):
    model_config = STRICT

    model: str
    task: str | None = None  # the task it was fine-tuned for (reports normalise by it)
    # data for data-driven methods: a JSONL file or task name, or {source, template, num_samples,
    # seed, allow_fewer}; the template defaults to the one the fine-tune recorded in training
    calibration: CalibrationSource | None = None
    # held-out train rows for `search:` (default: a held-out part of the calibration source)
    held_out: str | None = None


class MethodRun(BaseModel):
    model_config = STRICT

    method: str
    label: str | None = None
    parameters: dict[str, Setting] = Field(default_factory=dict)
    grid: dict[str, list[Scalar]] = Field(default_factory=dict)
    model_parameters: dict[str, dict[str, Setting]] = Field(default_factory=dict)  # per fine-tune
    finetunes: list[str] | None = None  # a subset of the experiment's fine-tunes (default: all)
    dtype: str | None = None
    # calibrate in this template instead of the fine-tunes' own (an ablation: chat, plain, ...)
    calibration_template: str | None = None
    search: HeldOutSearch | None = None  # pick one parameter on held-out train rows (selection.py)
    oracle: bool = False  # report only the grid point best on the test scores, labelled "oracle"

    @model_validator(mode="after")
    def _one_way_to_choose(self) -> MethodRun:
        if self.search and (self.oracle or self.search.parameter in self.grid):
            raise ValueError(
                f"search: {self.search.parameter!r} is searched; do not also grid it or set oracle"
            )
        if self.oracle and not self.grid:
            raise ValueError("oracle: true needs a `grid:` to pick from")
        return self

    def chosen(self) -> Chosen:
        """How this run's parameters are chosen (merge_harness.selection.grid)."""
        return "held-out" if self.search else "oracle" if self.oracle else "set"


class TaskRun(BaseModel):
    model_config = STRICT

    name: str
    limit: int | None = Field(None, ge=1)
    num_fewshot: int | None = Field(None, ge=0)


class Experiment(BaseModel):
    model_config = STRICT

    name: str = Field(min_length=1)
    base_model: str
    finetunes: dict[str, Finetune] = Field(min_length=1)
    methods: list[MethodRun] = Field(default_factory=list)
    tasks: list[str | TaskRun] = Field(min_length=1)
    evaluation: EvalSettings = Field(default_factory=EvalSettings)
    baselines: bool = True  # evaluate the base and each fine-tune too (rows of the paper tables)
    seed: int = 0
    # replicates: one experiment per seed, named `<name>-seed<seed>`, with `{seed}` in every string
    # (model paths, calibration and held-out files) replaced and `seed` set (`load_experiments`)
    seeds: list[int] | None = Field(None, min_length=1)
    device: str = "cpu"
    store: str | None = None
    _source: str = PrivateAttr("experiment")  # the YAML file, and the line of each field in it,
    _lines: dict = PrivateAttr(default_factory=dict)  # for errors found after parsing

    @model_validator(mode="after")
    def _known_finetunes(self) -> Experiment:
        for index, run in enumerate(self.methods):
            unknown = sorted((set(run.model_parameters) | set(run.finetunes or ())) - set(self.finetunes))
            if unknown:
                raise ValueError(f"methods[{index}] names unknown fine-tunes {unknown}")
        return self

    def task_runs(self) -> list[TaskRun]:
        return [TaskRun(name=t) if isinstance(t, str) else t for t in self.tasks]


def load_experiments(path: str | Path) -> list[Experiment]:
    """The experiment file's experiments: one, or one per seed when it sets `seeds:`."""
    experiment, lines = load_config_file(path, Experiment, "an experiment")
    loaded = replicates(experiment, path) if experiment.seeds else [experiment]
    for each in loaded:
        each._source, each._lines = str(path), lines
    return [_relative_to(each, Path(path).parent) for each in loaded]


def load_experiment(path: str | Path) -> Experiment:
    """The one experiment of a file (a file with several `seeds:` is refused: `load_experiments`)."""
    loaded = load_experiments(path)
    if len(loaded) != 1:
        raise ConfigError(f"{path}: seeds: makes {len(loaded)} experiments; name one seed (seeds: [N])")
    return loaded[0]


def replicates(experiment: Experiment, path: str | Path) -> list[Experiment]:
    """One experiment per seed of `seeds:`: `{seed}` replaced in every string, `seed` set."""

    def fill(value: Any, seed: int) -> Any:
        if isinstance(value, str):
            return value.replace("{seed}", str(seed))
        if isinstance(value, dict):
            return {key: fill(item, seed) for key, item in value.items()}
        if isinstance(value, list):
            return [fill(item, seed) for item in value]
        return value

    data = experiment.model_dump(mode="json", exclude_unset=True)
    if len(set(experiment.seeds or ())) != len(experiment.seeds or ()):
        raise ConfigError(f"{path}: seeds: {experiment.seeds} repeats a seed")
    out = []
    for seed in experiment.seeds or ():
        name = data["name"] if "{seed}" in data["name"] else f"{data['name']}-seed{seed}"
        out.append(Experiment.model_validate({**fill(data, seed), "name": fill(name, seed), "seed": seed,
                                              "seeds": None}))
    return out


def located(experiment: Experiment, *loc: str | int) -> str:
    """'file:line: field.path' of an experiment field, for errors found after parsing."""
    return f"{locate(experiment._source, experiment._lines, loc)}: {format_loc(loc)}"


def _relative_to(experiment: Experiment, root: Path) -> Experiment:
    """Paths in an experiment file are relative to that file (inputs where they exist there;
    the store always)."""
    finetunes = {
        name: ft.model_copy(
            update={
                "model": relative_to(ft.model, root),
                "calibration": calibration_relative_to(ft.calibration, root),
                "held_out": relative_to(ft.held_out, root),
            }
        )
        for name, ft in experiment.finetunes.items()
    }
    base = relative_to(experiment.base_model, root)
    store = output_relative_to(experiment.store, root)
    return experiment.model_copy(update={"base_model": base, "finetunes": finetunes, "store": store})


# ------------------------------------------------------------------------------------------ jobs


@dataclass
class TaskJob:
    key: str
    task: str
    settings: EvalSettings
    spec: dict[str, Any]


@dataclass
class ModelJob:
    """One model to build (load or merge) and the tasks to evaluate it on."""

    label: str
    kind: str  # "base" | "finetune" | "merge"
    model_ref: str | None  # for base / fine-tunes
    merge: MergeConfig | None  # for merges
    identity: dict[str, Any]
    tasks: list[TaskJob] = field(default_factory=list)
    search: SearchJob | None = None  # merges whose parameter is chosen on held-out train rows
    chosen: Chosen = "set"  # how the merge's parameters were chosen (merge_harness.selection.grid)


@dataclass(frozen=True)
class SearchJob:
    """A held-out search to run before merging: which parameter, on which train rows, rendered how."""

    settings: HeldOutSearch
    held_out: dict[str, str]  # fine-tune model -> its held-out source (a train JSONL or task)
    whole_sources: bool  # True: `held_out:` files as they are; False: their held-out fraction
    template: str
    calibration: dict[str, str]  # fine-tune model -> calibration source (calibrated methods)

    def identity(self, store: ResultStore | None, identify: bool = True) -> dict[str, Any]:
        """The recipe by content: held-out files by hash (by path when not `identify`ing)."""

        def data(ref: str) -> str | None:
            return calibration_identity(ref, store) if identify else ref

        record = self.settings.model_dump(mode="json")
        return {**record, "held_out": [data(s) for s in self.held_out.values()],
                "whole_sources": self.whole_sources, "template": self.template}


def held_out_search(experiment: Experiment, run: MethodRun, merge: MergeConfig) -> SearchJob:
    """The search of `run`: each fine-tune's `held_out:` rows, else its calibration source's
    held-out part; one template for all (the fine-tunes' own)."""
    from merge_harness.merge.calibration_data import resolve_template
    from merge_harness.merge.config import CalibrationSettings
    from merge_harness.selection.splits import check_selection_data

    chosen = run.finetunes or list(experiment.finetunes)
    used = {name: ft for name, ft in experiment.finetunes.items() if name in chosen}
    sources, templates = {}, set()
    explicit = {name for name, ft in used.items() if ft.held_out}
    if explicit and explicit != set(used):
        raise ConfigError(
            f"finetunes: `held_out:` is set for {sorted(explicit)} only; set it for all or none"
        )
    for name, ft in used.items():
        source = ft.held_out or (ft.calibration.source if ft.calibration else None)
        if source is None:
            raise ConfigError(
                f"finetunes.{name}: `search:` needs held-out train rows (`held_out:` or `calibration:`)"
            )
        sources[ft.model] = source
        entry = ft.calibration or CalibrationSource(source=source)
        model_dir = resolve_model(ft.model) if Path(ft.model).exists() else None
        where = f"finetunes.{name}.calibration"
        templates.add(resolve_template(entry, CalibrationSettings(), model_dir, where))
    if len(templates) != 1:
        raise ConfigError(f"search: the fine-tunes were trained with different templates {sorted(templates)}")
    check_selection_data(sources.values())  # never test rows; reads no file
    calibration = {ft.model: ft.calibration.source for ft in used.values() if ft.calibration}
    return SearchJob(run.search, sources, bool(explicit), templates.pop(), calibration)


def method_configs(experiment: Experiment) -> list[tuple[str, MergeConfig]]:
    """Expand every method's grid into (label, MergeConfig) pairs; labels must be unique."""
    return [(label, config) for label, _, config in method_points(experiment)]


def method_points(experiment: Experiment) -> list[tuple[str, MethodRun, MergeConfig]]:
    """(label, the method run it comes from, MergeConfig) per grid point.

    A searched parameter starts at its grid's first value; the runner merges at the value the
    held-out search chooses (`ModelJob.search`).
    """
    out: list[tuple[str, MethodRun, MergeConfig]] = []
    seen: dict[str, int] = {}
    for index, run in enumerate(experiment.methods):
        keys = sorted(run.grid)
        for values in itertools.product(*(run.grid[k] for k in keys)) if keys else [()]:
            point = dict(zip(keys, values))
            label = run.label or run.method
            if point:
                label += " (" + ", ".join(f"{k}={v}" for k, v in point.items()) + ")"
            if label in seen:
                raise ConfigError(
                    f"methods[{index}]: duplicate job spec {label!r} (same as methods[{seen[label]}]); "
                    "give one of them a different `label` or parameters"
                )
            seen[label] = index
            start = {run.search.parameter: run.search.grid[0]} if run.search else {}
            with method_errors(experiment, index):
                out.append((label, run, _merge_config(experiment, run, {**point, **start})))
    return out


@contextmanager
def method_errors(experiment: Experiment, index: int) -> Iterator[None]:
    """Errors of the merge configs a `methods:` entry generates, named in the experiment's terms:
    'experiment.yaml:12: methods[1] (ties): parameters.density: ...', not the generated config's
    `models[0]` or a tensor."""
    run = experiment.methods[index]
    try:
        yield
    except ParameterError as exc:
        field = _parameter_field(experiment, run, exc)
        place = locate(experiment._source, experiment._lines, ("methods", index, *field))
        raise ConfigError(f"{place}: methods[{index}] ({run.method}): {format_loc(field)}: "
                          f"{exc.reason}") from None
    except ValidationError as exc:
        error = exc.errors()[0]
        field = tuple("dtype" if p == "out_dtype" else p for p in error["loc"])
        raise ConfigError(f"{located(experiment, 'methods', index)} ({run.method}): "
                          f"{format_loc(field)}: {error['msg']}") from None
    except HarnessError as exc:
        if not str(exc).startswith(experiment._source):
            exc.args = (f"{located(experiment, 'methods', index)} ({run.method}): {exc}",)
        raise


def _parameter_field(experiment: Experiment, run: MethodRun, exc: ParameterError) -> tuple:
    """Where in the `methods:` entry the bad parameter was written."""
    name = exc.field.split(".")[0]
    if exc.scope is not None:
        names = [n for n in experiment.finetunes if run.finetunes is None or n in run.finetunes]
        finetune = names[exc.scope] if exc.scope < len(names) else None
        if finetune is not None and (name in run.model_parameters.get(finetune, {})
                                     or name not in {**run.parameters, **run.grid}):
            return ("model_parameters", finetune, name)
    if run.search and run.search.parameter == name:
        return ("search", "grid")
    return ("grid", name) if name in run.grid else ("parameters", name)


def _merge_config(experiment: Experiment, run: MethodRun, point: dict[str, Scalar]) -> MergeConfig:
    def calibration(ft: Finetune) -> dict:
        entry = ft.calibration.model_dump(exclude_none=True)
        return {**entry, "template": run.calibration_template} if run.calibration_template else entry

    models = [
        {
            "model": ft.model,
            "parameters": run.model_parameters.get(name, {}),
            **({"calibration": calibration(ft)} if ft.calibration else {}),
        }
        for name, ft in experiment.finetunes.items()
        if run.finetunes is None or name in run.finetunes
    ]
    data = {
        "method": run.method,
        "base_model": experiment.base_model,
        "models": models,
        "parameters": {**run.parameters, **point},
        "seed": experiment.seed,
        "device": experiment.device,
        **({"out_dtype": run.dtype} if run.dtype else {}),
    }
    return MergeConfig.model_validate(data)  # errors: see `method_errors`


def plan_jobs(
    experiment: Experiment, store: ResultStore | None = None, identify: bool = True
) -> list[ModelJob]:
    """Every (model, task) job of the experiment, with content-hash keys.

    With `identify=False` models are identified by their reference only (no file is read): for
    validating experiments whose weights are not on this machine; such keys are not stored.
    """
    from merge_harness.evaluate.evaluator import check_tasks
    from merge_harness.merge.plan import validate_config

    with field_errors(experiment, "tasks"):
        check_tasks([t.name for t in experiment.task_runs()])
    for index, run in enumerate(experiment.methods):  # a searched grid the method refuses: said first
        if run.search:
            with field_errors(experiment, "methods", index, "search", "grid"):
                check_grid(run.method, run.search.parameter, run.search.grid, where="grid")
    if identify:
        check_weights(experiment)  # headers only: before any file is hashed or job started
    identities: dict[str, dict[str, Any]] = {}

    def identity(ref: str) -> dict[str, Any]:
        if ref not in identities:
            identities[ref] = model_identity(ref, store) if identify else {"reference": ref}
        return identities[ref]

    jobs: list[ModelJob] = []
    if experiment.baselines:
        jobs.append(
            ModelJob("pre-trained", "base", experiment.base_model, None, identity(experiment.base_model))
        )
        for name, ft in experiment.finetunes.items():
            jobs.append(ModelJob(name, "finetune", ft.model, None, identity(ft.model)))
    where = {ft.model: f"finetunes.{name}.calibration" for name, ft in experiment.finetunes.items()}
    for label, run, merge in method_points(experiment):
        with method_errors(experiment, _index(experiment, run)):
            method = validate_config(merge)
        calibrated = method.merge_model is not None
        merge_id = merge_identity(merge, calibrated, identity, where, store, identify)
        search = held_out_search(experiment, run, merge) if run.search else None
        if search is not None:
            merge_id["search"] = search.identity(store, identify)
        jobs.append(ModelJob(label, "merge", None, merge, merge_id, search=search, chosen=run.chosen()))
    for job in jobs:
        attach_tasks(job, experiment.task_runs(), experiment.evaluation)
    return jobs


def _index(experiment: Experiment, run: MethodRun) -> int:
    return next(i for i, other in enumerate(experiment.methods) if other is run)


def model_fields(experiment: Experiment) -> list[tuple[tuple, str]]:
    """(field location, model reference) of every model the experiment names."""
    fields = [(("base_model",), experiment.base_model)]
    return fields + [(("finetunes", name, "model"), ft.model) for name, ft in experiment.finetunes.items()]


@contextmanager
def field_errors(experiment: Experiment, *loc: str | int) -> Iterator[None]:
    """Prefix an error of the block with the experiment field it comes from ('e.yaml:2: base_model: ')."""
    try:
        yield
    except HarnessError as exc:
        exc.args = (f"{located(experiment, *loc)}: {exc}",)
        raise


def resolve_models(experiment: Experiment) -> None:
    """Every model directory exists (or is a cached / reachable hub id); errors name the field."""
    for loc, ref in model_fields(experiment):
        with field_errors(experiment, *loc):
            resolve_model(ref)


def check_weights(experiment: Experiment) -> None:
    """Read every model's safetensors headers and plan every merge of every grid, reading no
    tensor: missing or truncated files, architectures, names, shapes and every parameter for
    every tensor fail here, before the first job starts (and before a store is created)."""
    from merge_harness.io.checkpoint import Checkpoint
    from merge_harness.merge.plan import build_plan

    resolve_models(experiment)  # all present before any header is read
    for loc, ref in model_fields(experiment):
        with field_errors(experiment, *loc):
            Checkpoint.open(resolve_model(ref)).close()
    for _, run, merge in method_points(experiment):
        with method_errors(experiment, _index(experiment, run)):
            build_plan(merge).close()


def validate_experiment(experiment: Experiment) -> list[ModelJob]:
    """Everything `run` checks before it opens the store: the jobs (keyed by reference, no file
    hashed) and the weights' headers."""
    jobs = plan_jobs(experiment, None, identify=False)
    check_weights(experiment)
    return jobs


def attach_tasks(job: ModelJob, task_runs: list[TaskRun], evaluation: EvalSettings) -> None:
    """Add one keyed TaskJob per task to a model job.

    The key holds each task's declared version and a hash of its config
    (merge_harness.evaluate.task_identity),
    so an edited task YAML never reuses results of the old one.
    """
    from merge_harness.evaluate.evaluator import catalog_for
    from merge_harness.evaluate.task_identity import task_identity

    versions = {"harness": merge_harness.__version__, "lm_eval": version("lm_eval")}
    catalog = catalog_for([task.name for task in task_runs])
    for task in task_runs:
        overrides = {"limit": task.limit, "num_fewshot": task.num_fewshot}
        settings = evaluation.model_copy(update={k: v for k, v in overrides.items() if v is not None})
        spec = {
            "label": job.label,
            "kind": job.kind,
            "model": job.identity,
            "task": task.name,
            "task_definition": task_identity(task.name, catalog),
            "evaluation": settings.model_dump(mode="json"),
            "versions": versions,
        }
        if job.merge is not None:
            spec["merge"] = {"method": job.merge.method, "parameters": plain_settings(job.merge.parameters)}
        job.tasks.append(TaskJob(content_key(spec), task.name, settings, spec))


def single_model_job(
    ref: str, tasks: list[str], evaluation: EvalSettings, store: ResultStore | None
) -> ModelJob:
    """The job of `merge-harness eval MODEL`: one model (HF id or directory), several tasks."""
    from merge_harness.evaluate.evaluator import check_tasks

    check_tasks(tasks)
    job = ModelJob(ref, "model", ref, None, model_identity(ref, store))
    attach_tasks(job, [TaskRun(name=t) for t in tasks], evaluation)
    return job
