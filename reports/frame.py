"""The comparison table of one experiment, shaped like the SLTA paper's tables.

Rows: the pre-trained model, each individual fine-tune, then each merge ("SLTA (attn/MLP)" for
slta at granularity attn_mlp; a grid's points are told apart by the parameters that vary).
Columns: one primary metric per task (`metrics.primary_metric`), in points, then "Avg." (mean over
the tasks; missing if a task is missing) and the cost columns (merge seconds, peak RSS in MB).
Optional blocks: *normalized* score = 100 * row / (the fine-tune tuned for that task, on that
task), and *delta* = row - task arithmetic (its held-out-selected row when there is one).
Every merge row says how its hyper-parameters were chosen (`merge_harness.selection.grid`): as set, on
held-out train rows, or "oracle" (a grid's best point on test, an upper bound).
Bold ("best") = the one best merge in each score column, compared at the shown precision (a tie
marks none); the pre-trained model and the fine-tunes are references and only compete when there
are no merges. Cost columns are never bold: their lowest value is marked instead (italic).
Uncertainty: lm-eval's stderr, in points, as "± se" when `TableOptions.stderr`; with per-sample
logs, a *paired* block of bootstrap p-values of each merge against the baseline row (task
arithmetic by default, `merge_harness.reports.significance`), and "*" on scores with p < 0.05.

`build_table` is pure (a results frame in, a `ComparisonTable` out); every renderer reads that.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from merge_harness.core.errors import ConfigError, StoreError
from merge_harness.reports import metrics as m
from merge_harness.reports import significance
from merge_harness.store.database import merge_of

AVERAGE = "Avg."
MERGE_TIME = "Merge (s)"
PEAK_RSS = "Peak RSS (MB)"
COST_COLUMNS = (MERGE_TIME, PEAK_RSS)
BLOCK_SUFFIX = {"score": "", "normalized": " (norm. %)", "delta": " (Δ TA)", "paired": " (p vs baseline)"}
GRANULARITY_ORDER = {"model": 0, "layer": 1, "attn_mlp": 2}


@dataclass(frozen=True)
class Column:
    task: str
    metric: str
    title: str


@dataclass(frozen=True)
class TableOptions:
    normalized: bool = False
    delta: bool = False
    costs: bool = True
    stderr: bool = False  # "± se" after each score (lm-eval's standard error, in points)
    baseline: str | None = None  # row label the paired test compares with (default: task arithmetic)
    tasks: Sequence[str] | None = None  # subset and order of task columns (default: all, sorted)
    metrics: Mapping[str, str] = field(default_factory=dict)  # task -> metric overrides


@dataclass(frozen=True)
class Cell:
    """One number as every format shows it; the format decides how to render the marks."""

    text: str  # the number at the block's precision, with "± se" when shown
    best: bool  # the one best merge of a score column (bold)
    lowest: bool  # the lowest value of a cost column (italic)
    mark: str  # "*": significantly different from the baseline (paired test), else ""


@dataclass
class Block:
    """One grid of numbers: index = row ids (table order), columns = column titles."""

    name: str  # "score" | "normalized" | "delta" | "paired"
    title: str
    values: pd.DataFrame
    decimals: dict[str, int]
    lower_is_better: frozenset[str] = frozenset()
    best: dict[str, list[str]] = field(default_factory=dict)
    signed: bool = False
    notes: list[str] = field(default_factory=list)  # how this block was computed
    stderr: pd.DataFrame | None = None  # same shape as `values`, in the same units
    show_stderr: bool = False
    lowest: dict[str, list[str]] = field(default_factory=dict)  # cost columns: the lowest rows
    marks: dict[tuple[str, str], str] = field(default_factory=dict)  # (row, column) -> "*"

    def text(self, row: str, column: str, missing: str = "–") -> str:
        value = self.values.at[row, column]
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return missing
        decimals = self.decimals.get(column, 2)
        text = f"{value:{'+' if self.signed else ''}.{decimals}f}"
        if self.show_stderr and self.stderr is not None and column in self.stderr.columns:
            se = self.stderr.at[row, column]
            if se is not None and not (isinstance(se, float) and math.isnan(se)):
                text += f" ± {se:.{decimals}f}"
        return text

    def cell(self, row: str, column: str, missing: str = "–") -> Cell:
        return Cell(self.text(row, column, missing), self.is_best(row, column),
                    row in self.lowest.get(column, ()), self.marks.get((row, column), ""))

    def is_best(self, row: str, column: str) -> bool:
        return row in self.best.get(column, ())


@dataclass
class ComparisonTable:
    experiment: str
    family: str
    rows: pd.DataFrame  # index = row id (job label): title, kind, method, params, params_text
    columns: list[Column]
    blocks: list[Block]
    notes: list[str]

    def block(self, name: str) -> Block | None:
        return next((b for b in self.blocks if b.name == name), None)

    def with_normalized(self, finetune_tasks: Mapping[str, str]) -> ComparisonTable:
        """The table with a normalized block (from its own scores; nothing is re-read), as a
        report without `--normalized` still colours its heatmap by it. ConfigError when the
        fine-tune -> task mapping names none of the table's tasks."""
        if self.block("normalized") is not None:
            return self
        normalized = _normalized_block(self.blocks[0], self.columns, self.rows, finetune_tasks)
        _best(normalized, _competing(self.rows))
        return dataclasses.replace(self, blocks=[self.blocks[0], normalized, *self.blocks[1:]])

    def showing_stderr(self, shown: bool = True) -> ComparisonTable:
        """The same table with its scores' "± se" shown or hidden (a display choice: nothing
        is recomputed)."""
        blocks = [dataclasses.replace(b, show_stderr=shown) if b.name == "score" else b for b in self.blocks]
        return dataclasses.replace(self, blocks=blocks)

    def parameter_notes(self) -> list[str]:
        """'TIES: density=0.5, lambda=1' for each merge whose title does not say it all."""
        return [f"{r.title}: {r.params_text}" for r in self.rows.itertuples() if r.params_text]

    def all_notes(self) -> list[str]:
        block_notes = [note for block in self.blocks for note in block.notes]
        params = self.parameter_notes()
        return self.notes + block_notes + (["Hyper-parameters: " + "; ".join(params)] if params else [])

    def to_frame(self) -> pd.DataFrame:
        """One flat DataFrame: metadata, scores, then "<col> (norm. %)" and "<col> (Δ TA)"."""
        meta = self.rows[["kind", "method", "params_text", "chosen"]].rename(
            columns={"params_text": "hyper-parameters", "chosen": "chosen by"})
        parts = [meta]
        for block in self.blocks:
            parts.append(block.values.rename(columns=lambda c, b=block: c + BLOCK_SUFFIX[b.name]))
            if block.stderr is not None:
                parts.append(block.stderr.dropna(axis=1, how="all").rename(columns=lambda c: f"{c} (se)"))
        frame = pd.concat(parts, axis=1)
        frame.index = pd.Index(self.rows["title"], name="model")
        return frame


# ------------------------------------------------------------------------------------- rows


def spec_params(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Merge parameters of a job spec, flattened as the store flattens them (`merge_of`)."""
    return merge_of(spec)[1]


def _row_meta(results: pd.DataFrame, finetune_order: Sequence[str]) -> pd.DataFrame:
    records = []
    for label, group in results.groupby("label", sort=False):
        spec = json.loads(group["spec_json"].iloc[0])
        method = spec.get("merge", {}).get("method") or group["method"].iloc[0]
        method = method if isinstance(method, str) else None
        kind = spec.get("kind") or ("merge" if method else "base" if label == "pre-trained"
                                    else "model")
        params = spec_params(spec) if method else {}
        selected = spec.get("selected") if isinstance(spec.get("selected"), Mapping) else None
        if selected:
            params[selected["parameter"]] = selected["value"]
        chosen = ("held-out" if selected else "set") if kind == "merge" else ""
        records.append({"id": str(label), "kind": kind, "method": method, "params": params,
                        "chosen": chosen, "searched": selected["parameter"] if selected else None})
    meta = pd.DataFrame.from_records(records).set_index("id")
    meta["params_text"] = [_params_text(row) for _, row in meta.iterrows()]
    meta["title"] = [_title(row_id, row) for row_id, row in meta.iterrows()]
    _disambiguate(meta)
    meta["order"] = [_order_key(row_id, row, finetune_order) for row_id, row in meta.iterrows()]
    return meta.sort_values("order").drop(columns="order")


def _title(row_id: str, row: pd.Series) -> str:
    if row["kind"] == "base":
        return "Pre-trained"
    if row["kind"] == "finetune":
        return f"Fine-tuned ({row_id})"
    method = row["method"]
    if row["kind"] != "merge" or not (row_id == method or row_id.startswith(f"{method} (")):
        return row_id  # a custom label says what the user wants to read
    title = m.method_title(method, row["params"])
    return f"{title} (held-out {row['searched']})" if row["chosen"] == "held-out" else title


CHOSEN_TEXT = {"held-out": "chosen on held-out train rows",
               "oracle": "oracle: the grid point best on the test scores"}


def _params_text(row: pd.Series) -> str:
    """'density=0.5', 'method defaults', 'lambda=0.35 (chosen on held-out train rows)'; ''
    for the pre-trained model and the fine-tunes."""
    if row["kind"] != "merge":
        return ""
    text = m.format_params(row["params"]) or "method defaults"
    return f"{text} ({CHOSEN_TEXT[row['chosen']]})" if row["chosen"] in CHOSEN_TEXT else text


def _keep_oracle_points(meta: pd.DataFrame, score: Block, oracle: Sequence[str]) -> pd.DataFrame:
    """For each `oracle: true` grid (its label), keep only the point with the best test average
    (ties: the first in table order), marked as an oracle: an upper bound, not a method."""
    for prefix in oracle:
        group = [i for i in meta.index if i == prefix or i.startswith(f"{prefix} (")]
        averages = score.values.loc[group, AVERAGE].dropna()
        if averages.empty:
            continue
        best = averages.idxmax()
        meta = meta.drop(index=[i for i in group if i != best])
        meta.at[best, "chosen"] = "oracle"
        meta.at[best, "params_text"] = _params_text(meta.loc[best])
        meta.at[best, "title"] = f"{meta.at[best, 'title']} (oracle)"
    score.values = score.values.loc[meta.index]
    return meta


def _disambiguate(meta: pd.DataFrame) -> None:
    """Rows with one title (a grid) get the parameters that differ among them appended."""
    for title, group in meta.groupby("title"):
        if len(group) < 2:
            continue
        names = sorted({k for p in group["params"] for k in p})
        varying = [k for k in names if len({repr(p.get(k)) for p in group["params"]}) > 1]
        for row_id, params in group["params"].items():
            shown = m.format_params({k: params.get(k) for k in varying}, skip=())
            meta.at[row_id, "title"] = f"{title} ({shown or row_id})"


def _order_key(row_id: str, row: pd.Series, finetune_order: Sequence[str]) -> tuple:
    kind = m.KIND_ORDER.get(row["kind"], 9)
    if row["kind"] == "finetune":
        position = list(finetune_order).index(row_id) if row_id in finetune_order else 99
        return (kind, position, 0, row["title"])
    methods = list(m.METHOD_TITLES)
    rank = methods.index(row["method"]) if row["method"] in methods else len(methods)
    granularity = GRANULARITY_ORDER.get(str(row["params"].get("granularity")), -1)
    return (kind, rank, granularity, row["title"])


# ------------------------------------------------------------------------------------ blocks


def _columns(results: pd.DataFrame, options: TableOptions) -> list[Column]:
    present = sorted(results["task"].unique())
    tasks = list(options.tasks) if options.tasks else present
    if unknown := [t for t in tasks if t not in present]:
        raise ConfigError(f"tasks {unknown} have no results in this experiment; "
                          f"tasks with results: {', '.join(present)}")
    columns = []
    for task in tasks:
        available = results.loc[results["task"] == task, "metric"].unique()
        metric = options.metrics.get(task) or m.primary_metric(task, available)
        if metric not in available:
            raise ConfigError(f"task {task!r} has no metric {metric!r}; it reports: "
                              f"{', '.join(sorted(available))}")
        columns.append(Column(task, metric, m.task_title(task)))
    titles = [c.title for c in columns]
    return [Column(c.task, c.metric, c.task if titles.count(c.title) > 1 else c.title)
            for c in columns]


def _competing(meta: pd.DataFrame) -> list[str]:
    """The rows that compete for bold: the merges, else (no merges) every row. Passthrough copies
    one model: a reference row, like the fine-tunes, not a competing merge."""
    merges = list(meta.index[(meta["kind"] == "merge") & (meta["method"] != "passthrough")])
    return merges or list(meta.index)


def _best(block: Block, candidates: Sequence[str]) -> None:
    """Bold only a best that is not tied at the shown precision; a cost column's lowest value gets
    its own mark (costs are not scores: the cheapest merge is not the best one)."""
    for column in block.values.columns:
        shown = block.values.loc[list(candidates), column].round(block.decimals.get(column, 2))
        shown = shown.dropna()
        if shown.empty:
            continue
        target = shown.min() if column in block.lower_is_better else shown.max()
        winners = [row for row, value in shown.items() if value == target]
        if len(winners) == 1:
            (block.lowest if column in COST_COLUMNS else block.best)[column] = winners


def _score_block(results: pd.DataFrame, columns: list[Column], meta: pd.DataFrame,
                 costs: bool) -> Block:
    values = pd.DataFrame(index=meta.index)
    stderr = pd.DataFrame(index=meta.index)
    for col in columns:
        picked = results[(results["task"] == col.task) & (results["metric"] == col.metric)]
        by_label = picked.groupby("label")
        values[col.title] = by_label["value"].first() * m.points_per_unit(col.metric)
        if "stderr" in picked:
            stderr[col.title] = (pd.to_numeric(by_label["stderr"].first(), errors="coerce")
                                 * m.points_per_unit(col.metric))
    values[AVERAGE] = values[[c.title for c in columns]].mean(axis=1, skipna=False)
    lower = {c.title for c in columns if not m.higher_is_better(c.metric)}
    decimals = {c: 2 for c in values.columns}
    if costs:
        by_row = results.groupby("label")
        if "time_merge" in results and results["time_merge"].notna().any():
            values[MERGE_TIME] = by_row["time_merge"].max()
            decimals[MERGE_TIME], lower = 1, lower | {MERGE_TIME}
        if results["peak_rss_mb"].notna().any():
            values[PEAK_RSS] = by_row["peak_rss_mb"].max()
            decimals[PEAK_RSS], lower = 0, lower | {PEAK_RSS}
    return Block("score", "Score (points)", values.astype(float), decimals, frozenset(lower),
                 stderr=stderr.astype(float))


def _same_task(tuned_for: str, task: str) -> bool:
    def family(name: str) -> str:
        return name.removesuffix("_fixture")
    return tuned_for == task or family(tuned_for) == family(task)


def _normalized_block(score: Block, columns: list[Column], meta: pd.DataFrame,
                      finetune_tasks: Mapping[str, str]) -> Block:
    values = pd.DataFrame(index=score.values.index, dtype=float)
    notes: list[str] = []
    for col in columns:
        tuned = [f for f, t in finetune_tasks.items() if _same_task(t, col.task) and f in meta.index]
        reference = score.values.at[tuned[0], col.title] if tuned else float("nan")
        if not tuned or pd.isna(reference) or not reference:
            why = ("no fine-tune was tuned for it" if not tuned else
                   f"{tuned[0]} has no score on it" if pd.isna(reference) else f"{tuned[0]} scores 0")
            notes.append(f"{col.title}: no normalized score ({why}).")
            values[col.title] = float("nan")
            continue
        values[col.title] = 100 * score.values[col.title] / reference
        notes.append(f"{col.title}: 100 x score / {meta.at[tuned[0], 'title']}.")
    if values.isna().all().all():
        raise ConfigError("normalized scores need the fine-tune -> task mapping (`finetunes: "
                          "{name: {model, task}}` in the experiment) to name the tasks of "
                          f"this table ({', '.join(c.task for c in columns)}); got "
                          f"{dict(finetune_tasks) or 'none'}")
    values[AVERAGE] = values.mean(axis=1, skipna=False)
    return Block("normalized", "Normalized score (% of the fine-tune)", values,
                 {c: 1 for c in values.columns}, notes=["Normalized: " + " ".join(notes)])


def baseline_row(score: Block, meta: pd.DataFrame, wanted: str | None = None) -> tuple[str, str]:
    """(row, why): the row merges are compared with. `wanted` (a row label) if given; else task
    arithmetic: its held-out-selected row, its only row, or its best on test (said: an oracle)."""
    if wanted is not None:
        if wanted not in meta.index:
            raise ConfigError(f"baseline {wanted!r} is not a row of this table; "
                              f"rows: {', '.join(meta.index)}")
        return wanted, "the chosen baseline"
    arithmetic = meta.index[meta["method"] == "task_arithmetic"]
    if arithmetic.empty:
        methods = sorted({str(x) for x in meta["method"].dropna()})
        raise ConfigError("comparing with task arithmetic needs a task_arithmetic row; this "
                          f"experiment has the methods: {', '.join(methods) or 'none'}")
    held_out = [row for row in arithmetic if meta.at[row, "chosen"] == "held-out"]
    averages = score.values.loc[arithmetic, AVERAGE]
    if held_out:
        reference, why = held_out[0], "its lambda chosen on held-out train rows"
    elif len(arithmetic) == 1:
        reference, why = arithmetic[0], "the only task-arithmetic row"
    else:
        reference = averages.idxmax() if averages.notna().any() else arithmetic[0]
        why = "the task-arithmetic row with the best test average: an oracle choice"
    return reference, why


def _delta_block(score: Block, columns: list[Column], meta: pd.DataFrame, wanted: str | None) -> Block:
    reference, why = baseline_row(score, meta, wanted)
    titles = [c.title for c in columns] + [AVERAGE]
    values = score.values[titles] - score.values.loc[reference, titles]
    note = f"Δ TA: score minus {meta.at[reference, 'title']} ({why}), in points."
    return Block("delta", "Δ vs task arithmetic (points)", values, {c: 2 for c in titles},
                 score.lower_is_better & set(titles), signed=True, notes=[note])


def _paired_block(score: Block, columns: list[Column], meta: pd.DataFrame,
                  samples: Mapping[str, list[dict]], wanted: str | None, notes: list[str]) -> list[Block]:
    """p-values of the paired bootstrap of each merge against the baseline, per task; "*" marks
    the merge's score where p < 0.05. No block when the baseline has no per-sample log."""
    try:
        reference, why = baseline_row(score, meta, wanted)
    except ConfigError:
        return []
    if not samples.get(reference):
        notes.append("No paired test: the baseline's per-sample results were not stored "
                     "(evaluation.log_samples: true stores them).")
        return []
    merges = [row for row in meta.index if meta.at[row, "kind"] == "merge" and row != reference]
    values = pd.DataFrame(index=meta.index, columns=[c.title for c in columns], dtype=float)
    untested = []
    for col in columns:
        base = significance.sample_scores(samples[reference], col.task, col.metric)
        if base.empty:
            untested.append(col.title)
            continue
        for row in merges:
            test = significance.paired_test(
                significance.sample_scores(samples.get(row) or [], col.task, col.metric), base)
            if test is not None:
                values.at[row, col.title] = test.p_value
                if test.significant:
                    score.marks[(row, col.title)] = "*"
    title = meta.at[reference, "title"]
    note = (f"Paired: two-sided p-value of a paired bootstrap ({significance.RESAMPLES} resamples of the "
            f"test documents) of each merge against {title} ({why}); * on a score: p < {significance.ALPHA}.")
    if untested:
        note += f" Not tested (no per-document score, e.g. corpus-level BLEU): {', '.join(untested)}."
    return [Block("paired", f"Paired test vs {title} (p-value)", values, {c: 3 for c in values.columns},
                  notes=[note])]


SANDBOX_COUNTS = {  # per-task counts from the sandboxed code tasks, told in the notes when > 0
    "sandbox_errors": "samples the sandbox could not run (left out of pass@k)",
    "timeouts": "samples that timed out",
}


def _sandbox_notes(results: pd.DataFrame, meta: pd.DataFrame, tasks: Sequence[str]) -> list[str]:
    """'HumanEval: samples the sandbox could not run (...): TIES 2; Linear 1.' per task and count."""
    counted = results[results["metric"].isin(SANDBOX_COUNTS.keys()) & results["task"].isin(tasks)
                      & (results["value"] > 0) & results["label"].isin(meta.index)]
    notes = []
    for (task, metric), group in counted.groupby(["task", "metric"], sort=True):
        rows = "; ".join(f"{meta.at[label, 'title']} {value:g}"
                         for label, value in zip(group["label"], group["value"]))
        notes.append(f"{m.task_title(task)}: {SANDBOX_COUNTS[metric]}: {rows}.")
    return notes


# ------------------------------------------------------------------------------------- table


def build_table(results: pd.DataFrame, finetune_tasks: Mapping[str, str],
                options: TableOptions = TableOptions(), family: str | None = None,
                oracle: Sequence[str] = (),
                samples: Mapping[str, list[dict]] | None = None) -> ComparisonTable:
    """The comparison table of the results of one experiment (a `results_frame`).

    `oracle`: labels of grids (`oracle: true` methods) reduced to their best point on test.
    `samples`: row label -> its per-sample log (lm-eval's, as stored): enables the paired test.
    """
    if results.empty:
        raise StoreError("there are no results to tabulate (the results frame is empty)")
    experiments = sorted(results["experiment"].unique())
    if len(experiments) > 1:
        raise ConfigError(f"one table per experiment; the results hold {experiments}")
    columns = _columns(results, options)
    tasks = [c.task for c in columns]
    finetune_order = sorted(finetune_tasks, key=lambda f: next(
        (i for i, t in enumerate(tasks) if _same_task(finetune_tasks[f], t)), len(tasks)))
    meta = _row_meta(results, finetune_order)
    notes = ["Scores in points: " + "; ".join(
        f"{c.title} = {c.metric}" + (" x 100" if m.points_per_unit(c.metric) != 1 else "")
        for c in columns) + f". {AVERAGE} = mean over the tasks."]
    notes += _sandbox_notes(results, meta, tasks)
    blocks = [_score_block(results, columns, meta, options.costs)]
    meta = _keep_oracle_points(meta, blocks[0], oracle)
    if options.normalized:
        blocks.append(_normalized_block(blocks[0], columns, meta, finetune_tasks))
    if options.delta:
        blocks.append(_delta_block(blocks[0], columns, meta, options.baseline))
    merges = _competing(meta)
    if samples:
        blocks += _paired_block(blocks[0], columns, meta, samples, options.baseline, notes)
    blocks[0].show_stderr = options.stderr
    for block in blocks:
        if block.name != "paired":
            _best(block, merges)
    noun = "merge" if (meta["kind"] == "merge").any() else "model"
    notes.append(f"Bold: the best {noun} in each column (none where tied)"
                 + (f"; italic: the lowest {' and '.join(COST_COLUMNS)}" if options.costs else "") + ".")
    if options.stderr:
        notes.append("± : lm-eval's standard error of the score, in points.")
    return ComparisonTable(experiments[0], family or experiments[0], meta, columns, blocks, notes)


def comparison_table(store, experiment: str, options: TableOptions = TableOptions()) -> ComparisonTable:
    """`build_table` on the store's results of `experiment`, with its fine-tune -> task mapping."""
    from merge_harness.reports import source

    source.resolve_experiments(store, experiment)
    config = source.experiment_config(store, experiment)
    results = store.results_frame(experiment)
    if options.tasks is None and config.get("tasks"):  # the experiment's order of tasks
        named = [t if isinstance(t, str) else t.get("name") for t in config["tasks"]]
        present = set(results["task"])
        order = [t for t in named if t in present] + sorted(present - set(named))
        options = dataclasses.replace(options, tasks=order)
    return build_table(results, source.finetune_tasks(config), options,
                       source.model_family(config, experiment), source.oracle_labels(config),
                       source.samples_by_label(store, results))


def comparison_frame(store, experiment: str, *, normalized: bool = False, delta: bool = False,
                     tasks: Sequence[str] | None = None,
                     metrics: Mapping[str, str] | None = None) -> pd.DataFrame:
    """The comparison table as one pandas DataFrame (rows = models, see `to_frame`)."""
    options = TableOptions(normalized=normalized, delta=delta, tasks=tasks, metrics=metrics or {})
    return comparison_table(store, experiment, options).to_frame()
