"""Paper-table specs (reports/paper/*.yaml): a paper's table filled with our measurements.

A spec names the tasks (and metric) of the columns, the rows (pre-trained, each fine-tune, each
merge method with the parameters that identify it), and one or more model sets (a base model,
its fine-tunes -> the task each was tuned for, the experiment that measures them) with the
paper's reference numbers. A reference cell is null until someone transcribes it from the paper
(and names the table in `source`): we never invent published numbers, and the rendering says
which cells are empty, which rows are not measured yet, and the command that measures them.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, RootModel, model_validator

from merge_harness.core.config_files import load_config_file, output_relative_to
from merge_harness.core.errors import ConfigError
from merge_harness.merge.config import Scalar
from merge_harness.reports import metrics as m
from merge_harness.reports.frame import AVERAGE, ComparisonTable, TableOptions, build_table
from merge_harness.tasks import task_files

SPEC_DIR = Path(__file__).parent / "paper"
BUILTIN_TASKS = {"gsm8k", "winogrande"}  # lm-eval's own, used as they are
STRICT = ConfigDict(extra="forbid")


class PaperTask(BaseModel):
    model_config = STRICT
    name: str
    title: str | None = None
    metric: str | None = None  # default: metrics.primary_metric(name)


class PaperRow(BaseModel):
    model_config = STRICT
    label: str
    kind: Literal["base", "finetune", "merge"]
    finetune: str | None = None  # kind finetune: its name in the model set's `finetunes`
    method: str | None = None  # kind merge: the registered method id
    parameters: dict[str, Scalar] = Field(default_factory=dict)  # must match the merge's

    @model_validator(mode="after")
    def _complete(self) -> PaperRow:
        if self.kind == "finetune" and not self.finetune:
            raise ValueError(f"row {self.label!r} of kind finetune needs `finetune: NAME`")
        if self.kind == "merge" and not self.method:
            raise ValueError(f"row {self.label!r} of kind merge needs `method: ID`")
        return self


class Reference(BaseModel):
    """The paper's numbers: `values` inline, or `values_file` (a YAML file of the same shape,
    row label -> task -> value in points, relative to the spec), never both; `source` names the
    paper and table they were transcribed from. A value left null reads "not transcribed"."""

    model_config = STRICT
    source: str = Field(min_length=1)  # paper and table the numbers come from
    values: dict[str, dict[str, float | None]] = Field(default_factory=dict)  # row -> task -> value
    values_file: str | None = None

    @model_validator(mode="after")
    def _one_place(self) -> Reference:
        if self.values and self.values_file:
            raise ValueError("give the reference numbers as `values` or in `values_file`, not both")
        return self


class ReferenceValues(RootModel[dict[str, dict[str, float | None]]]):
    """A values file: row label -> task -> the paper's value in points."""


class ModelSet(BaseModel):
    model_config = STRICT
    name: str
    base: str
    finetunes: dict[str, str] = Field(min_length=1)  # fine-tune name -> the task it was tuned for
    experiment: str  # the experiment (in the result store) that measures this set
    experiment_file: str | None = None  # the YAML that defines it (`merge-harness run FILE`)
    reference: Reference | None = None


class PaperSpec(BaseModel):
    model_config = STRICT
    name: str
    title: str
    paper: str
    metric_note: str = ""
    tasks: list[PaperTask] = Field(min_length=1)
    rows: list[PaperRow] = Field(min_length=1)
    model_sets: list[ModelSet] = Field(min_length=1)


# ------------------------------------------------------------------------------ loading


def available_specs() -> list[str]:
    return sorted(p.stem for p in SPEC_DIR.glob("*.yaml"))


def known_tasks() -> set[str]:
    """Task names defined by tasks/**/*.yaml, plus the lm-eval built-ins we use."""
    return set(BUILTIN_TASKS) | set(task_files())


def known_methods() -> set[str]:
    """Registered merge methods (built-ins and plugins) plus every method the reports name."""
    try:
        from merge_harness.merge.methods import method_registry

        registered = set(method_registry())
    except Exception:  # a broken plugin must not stop a report; the names below still count
        registered = set()
    return registered | set(m.METHOD_TITLES)


def load_spec(name_or_path: str | Path) -> PaperSpec:
    """A spec by name (reports/paper/NAME.yaml) or by path, validated."""
    text = str(name_or_path)
    by_name = "/" not in text and not text.endswith((".yaml", ".yml"))
    path = SPEC_DIR / f"{text}.yaml" if by_name else Path(text)
    if not path.is_file():
        raise ConfigError(f"unknown paper spec {text!r}; known: {', '.join(available_specs())} "
                          "(or pass the path of a YAML file)")
    spec, _ = load_config_file(path, PaperSpec, "a paper spec")
    spec = _relative_to_spec(spec, path)
    validate(spec, str(path))
    return spec


def _relative_to_spec(spec: PaperSpec, path: Path) -> PaperSpec:
    """Files a spec names (experiment files, values files) are relative to the spec, and a
    values file is read into `values` (its errors name that file)."""
    root = path.parent
    sets = []
    for model_set in spec.model_sets:
        update: dict = {"experiment_file": output_relative_to(model_set.experiment_file, root)}
        reference = model_set.reference
        if reference is not None and reference.values_file:
            values_path = Path(output_relative_to(reference.values_file, root))
            values, _ = load_config_file(values_path, ReferenceValues, "a reference values file")
            update["reference"] = reference.model_copy(update={"values": values.root,
                                                               "values_file": str(values_path)})
        sets.append(model_set.model_copy(update=update))
    return spec.model_copy(update={"model_sets": sets})


def validate(spec: PaperSpec, where: str) -> None:
    """Names must exist: methods, tasks, fine-tunes, and the rows/tasks of reference values."""
    methods, tasks = known_methods(), known_tasks()
    for i, row in enumerate(spec.rows):
        if row.method and row.method not in methods:
            raise ConfigError(f"{where}: rows[{i}].method: unknown method {row.method!r} "
                              f"(known: {', '.join(sorted(methods))})")
    for i, task in enumerate(spec.tasks):
        if task.name not in tasks:
            raise ConfigError(f"{where}: tasks[{i}].name: unknown task {task.name!r} "
                              f"(known: {', '.join(sorted(tasks))})")
    columns, labels = {t.name for t in spec.tasks}, {r.label for r in spec.rows}
    for i, model_set in enumerate(spec.model_sets):
        at = f"{where}: model_sets[{i}] ({model_set.name})"
        if bad := sorted(set(model_set.finetunes.values()) - columns):
            raise ConfigError(f"{at}.finetunes: tasks {bad} are not columns of the table "
                              f"(tasks: {', '.join(sorted(columns))})")
        for row in spec.rows:
            if row.finetune and row.finetune not in model_set.finetunes:
                raise ConfigError(f"{at}: row {row.label!r} names fine-tune {row.finetune!r}; "
                                  f"this set has {', '.join(model_set.finetunes)}")
        for label, cells in (model_set.reference.values if model_set.reference else {}).items():
            if label not in labels:
                raise ConfigError(f"{at}.reference.values: unknown row {label!r} "
                                  f"(rows: {', '.join(r.label for r in spec.rows)})")
            if bad := sorted(set(cells) - columns):
                raise ConfigError(f"{at}.reference.values.{label}: unknown tasks {bad} "
                                  f"(tasks: {', '.join(sorted(columns))})")


# ------------------------------------------------------------------------------ filling


def _match(table: ComparisonTable, row: PaperRow) -> tuple[str | None, str]:
    """The table row measuring `row`, and a note when the choice was not unique."""
    meta = table.rows
    if row.kind == "base":
        found = list(meta.index[meta["kind"] == "base"])
    elif row.kind == "finetune":
        found = [r for r in meta.index[meta["kind"] == "finetune"] if r == row.finetune]
    else:
        found = [r for r in meta.index[meta["method"] == row.method]
                 if all(str(meta.at[r, "params"].get(k)) == str(v) for k, v in row.parameters.items())]
    if len(found) <= 1:
        return (found[0] if found else None), ""
    held_out = [r for r in found if meta.at[r, "chosen"] == "held-out"]
    if held_out:  # never pick by test scores when a row was chosen on held-out data
        chosen = held_out[0]
        return chosen, f"{row.label}: the row chosen on held-out train rows ({meta.at[chosen, 'title']})"
    averages = table.blocks[0].values.loc[found, AVERAGE]
    best = averages.idxmax() if averages.notna().any() else found[0]
    return best, (f"{row.label}: best of {len(found)} measured rows by average on test, an oracle "
                  f"choice ({meta.at[best, 'title']})")


def fill(spec: PaperSpec, model_set: ModelSet, results: pd.DataFrame | None) -> pd.DataFrame:
    """Rows = spec rows; columns (task, "measured" | "paper" | "delta"), in points; plus notes."""
    tasks = [t.name for t in spec.tasks]
    cells = pd.DataFrame(index=[r.label for r in spec.rows], dtype=float,
                         columns=pd.MultiIndex.from_product([[*tasks, AVERAGE],
                                                             ["measured", "paper", "delta"]]))
    notes: list[str] = []
    references = model_set.reference.values if model_set.reference else {}
    table = None
    if results is not None and not results.empty:
        measured = [t for t in tasks if t in set(results["task"])]
        metrics = {t.name: t.metric for t in spec.tasks if t.metric and t.name in measured}
        if measured:
            table = build_table(results, model_set.finetunes,
                                TableOptions(tasks=measured, metrics=metrics, costs=False))
    for row in spec.rows:
        for task in tasks:
            cells.loc[row.label, (task, "paper")] = references.get(row.label, {}).get(task)
        if table is None:
            continue
        found, note = _match(table, row)
        notes += [note] if note else []
        for column in table.columns if found else []:
            cells.loc[row.label, (column.task, "measured")] = table.blocks[0].values.at[found, column.title]
    for kind in ("measured", "paper"):
        cells[(AVERAGE, kind)] = cells.xs(kind, axis=1, level=1)[tasks].mean(axis=1, skipna=False)
    for task in [*tasks, AVERAGE]:
        cells[(task, "delta")] = cells[(task, "measured")] - cells[(task, "paper")]
    cells.attrs["notes"] = notes
    return cells


def _text(value: float, signed: bool = False, missing: str = "–") -> str:
    return missing if pd.isna(value) else f"{value:{'+' if signed else ''}.2f}"


NOT_TRANSCRIBED = "not transcribed"


def render_markdown(spec: PaperSpec, results: Mapping[str, pd.DataFrame | None],
                    store_path: str = "the result store") -> str:
    """Measured vs paper for every model set; `results` maps experiment -> its results frame."""
    titles = {t.name: t.title or m.task_title(t.name) for t in spec.tasks}
    lines = [f"# {spec.title}", "", f"Paper: {spec.paper}."]
    lines += [spec.metric_note] if spec.metric_note else []
    for model_set in spec.model_sets:
        cells = fill(spec, model_set, results.get(model_set.experiment))
        columns = [*titles, AVERAGE]
        header = [f"{titles.get(c, c)} {part}" for c in columns for part in ("ours", "paper", "Δ")]
        lines += ["", f"## {model_set.name} (experiment `{model_set.experiment}`)", "",
                  "| Model | " + " | ".join(header) + " |", "|:--|" + "--:|" * len(header)]
        for label, row in cells.iterrows():
            unfilled = NOT_TRANSCRIBED if model_set.reference is not None else "–"  # none exists
            parts = [_text(row[(c, part)], part == "delta", unfilled if part == "paper" else "–")
                     for c in columns for part in ("measured", "paper", "delta")]
            lines.append(f"| {label} | " + " | ".join(parts) + " |")
        lines += ["", *_set_notes(spec, model_set, cells, store_path)]
    return "\n".join(lines) + "\n"


def _shown(path: str) -> str:
    """A path as a user types it here: relative to the working directory when under it."""
    resolved = Path(path).resolve()
    return str(resolved.relative_to(Path.cwd())) if resolved.is_relative_to(Path.cwd()) else str(resolved)


def _set_notes(spec: PaperSpec, model_set: ModelSet, cells: pd.DataFrame, store_path: str) -> list[str]:
    tasks = [t.name for t in spec.tasks]
    reference = model_set.reference
    notes = [f"- Reference: {reference.source if reference else 'none given for this model set'}."]
    if cells.xs("paper", axis=1, level=1)[tasks].isna().all().all():
        notes.append("- No reference value has been transcribed: the paper columns stay empty "
                     "until `reference.values` is filled from the paper (with its table named).")
    missing = {label: [t for t in tasks if pd.isna(cells.at[label, (t, "measured")])]
               for label in cells.index}
    missing = {label: ts for label, ts in missing.items() if ts}
    if missing:
        command = (f"merge-harness run {_shown(model_set.experiment_file)}" if model_set.experiment_file
                   else f"merge-harness run <the YAML of experiment {model_set.experiment}>")
        if len(missing) == len(cells.index) and all(len(ts) == len(tasks) for ts in missing.values()):
            what = f"No cell is measured yet: {store_path} has no results of experiment"
            notes.append(f"- {what} `{model_set.experiment}`. Fill them with `{command}`.")
        else:
            listed = "; ".join(f"{label}: {', '.join(ts)}" for label, ts in missing.items())
            notes.append(f"- Not measured yet in {store_path}: {listed}. Fill them with `{command}`.")
        if model_set.experiment_file and not Path(model_set.experiment_file).exists():
            finetunes = ", ".join(f"{n} -> {t}" for n, t in model_set.finetunes.items())
            notes.append(f"- {_shown(model_set.experiment_file)} does not exist yet: write it with base "
                         f"{model_set.base}, fine-tunes {finetunes}, name {model_set.experiment}.")
    notes += [f"- {note}." for note in cells.attrs.get("notes", [])]
    return notes
