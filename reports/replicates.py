"""An experiment replicated over seeds (`seeds:` in its YAML): every seed's comparison table, the
mean over seeds with its 95% interval, and paired tests pooled over the seeds.

A `seeds:` experiment NAME runs as NAME-seed0, NAME-seed1, ... (`merge_harness.run.experiment`).
Each replicate's table is the ordinary one (`comparison_table`: primary metric per task, oracle
grids reduced to their best test point), so a row means the same thing in every seed; an oracle
row is named by its grid's label, as its picked point may differ between seeds.

- **Interval**: mean over seeds +- t_{0.975, n-1} x sd / sqrt(n) (Student t; n = seeds). With
  three seeds t = 4.30: the interval is wide, and says how much the training seed alone moves a
  score.
- **Paired test** of a row against a baseline row on one task, pooled over seeds: both answered
  the same test documents in every seed. Per-document metrics (exact match, pass@1): the paired
  bootstrap of `merge_harness.reports.significance` on the differences of all seeds' documents.
  Corpus metrics (BLEU, chrF): Koehn's (2004) paired bootstrap resampling, i.e. resample each
  seed's documents, recompute both corpus scores, and average the difference over seeds.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

from merge_harness.core.errors import ConfigError
from merge_harness.reports import source
from merge_harness.reports.frame import AVERAGE, ComparisonTable, TableOptions, comparison_table
from merge_harness.reports.metrics import points_per_unit
from merge_harness.reports.significance import (
    RESAMPLES,
    PairedTest,
    metric_values,
    paired_bootstrap,
    sample_scores,
)
from merge_harness.store.database import ResultStore

REPLICATE = re.compile(r"^(?P<name>.+)-seed(?P<seed>\d+)$")
CORPUS_RESAMPLES = 1000  # each resample recomputes two corpus scores per seed


def replicate_names(store: ResultStore, name: str) -> dict[int, str]:
    """seed -> experiment name of NAME's replicates that have results; an error if none."""
    found = {}
    for experiment in source.experiment_names(store, with_results=True):
        match = REPLICATE.match(experiment)
        if match and match["name"] == name:
            found[int(match["seed"])] = experiment
    if not found:
        raise ConfigError(f"{store.path}: no results of replicates {name}-seed<N> "
                          f"(experiments: {', '.join(source.experiment_names(store)) or 'none'})")
    return dict(sorted(found.items()))


@dataclass(frozen=True)
class Replicates:
    """The per-seed comparison tables of one replicated experiment."""

    name: str
    tables: dict[int, ComparisonTable]  # seed -> table
    configs: dict[int, dict]  # seed -> the replicate's experiment config, as stored
    results: dict[int, pd.DataFrame]  # seed -> the replicate's `results_frame`, read once

    @property
    def seeds(self) -> list[int]:
        return list(self.tables)

    def labels(self, seed: int) -> dict[str, str]:
        """Row name across seeds -> its label in `seed`'s table (they differ for oracle rows)."""
        return {self.row_id(seed, label): label for label in self.tables[seed].blocks[0].values.index}

    def label_of(self, seed: int, row: str) -> str | None:
        return self.labels(seed).get(row)

    def row_id(self, seed: int, label: str) -> str:
        """The row's name across seeds (an oracle row: its grid's label)."""
        table = self.tables[seed]
        if table.rows.at[label, "chosen"] == "oracle":
            for prefix in source.oracle_labels(self.configs[seed]):
                if label == prefix or label.startswith(f"{prefix} ("):
                    return prefix
        return label

    def scores(self) -> pd.DataFrame:
        """Long form: seed, row, title, kind, column, value (points), params (the row's
        parameters in that seed, e.g. the lambda its search chose)."""
        records = []
        for seed, table in self.tables.items():
            score = table.blocks[0]
            columns = [c.title for c in table.columns] + [AVERAGE]
            for label in score.values.index:
                meta = table.rows.loc[label]
                for column in columns:
                    records.append({"seed": seed, "row": self.row_id(seed, label), "label": label,
                                    "title": meta["title"], "kind": meta["kind"], "column": column,
                                    "value": float(score.values.at[label, column]),
                                    "params": meta["params_text"]})
        return pd.DataFrame.from_records(records)


def load_replicates(store: ResultStore, name: str,
                    options: TableOptions = TableOptions(costs=False)) -> Replicates:
    names = replicate_names(store, name)
    tables = {seed: comparison_table(store, experiment, options) for seed, experiment in names.items()}
    configs = {seed: source.experiment_config(store, experiment) for seed, experiment in names.items()}
    results = {seed: store.results_frame(experiment) for seed, experiment in names.items()}
    return Replicates(name, tables, configs, results)


def t_interval(values: Sequence[float]) -> tuple[float, float]:
    """(mean, half-width of the 95% Student-t interval); half-width NaN for one value."""
    data = np.asarray([v for v in values if not math.isnan(v)], dtype=float)
    if data.size == 0:
        return math.nan, math.nan
    if data.size == 1:
        return float(data[0]), math.nan
    half = stats.t.ppf(0.975, data.size - 1) * data.std(ddof=1) / math.sqrt(data.size)
    return float(data.mean()), float(half)


def interval_table(scores: pd.DataFrame, rows: Sequence[str] | None = None) -> pd.DataFrame:
    """rows x columns of 'mean ± half-width' text (points), in `rows` order (default: as found)."""
    order = list(dict.fromkeys(rows or scores["row"]))
    columns = list(dict.fromkeys(scores["column"]))
    cells = {}
    for (row, column), group in scores.groupby(["row", "column"], sort=False):
        mean, half = t_interval(group["value"].tolist())
        cells[(row, column)] = f"{mean:.1f}" + ("" if math.isnan(half) else f" ± {half:.1f}")
    return pd.DataFrame([[cells.get((r, c), "–") for c in columns] for r in order], index=order,
                        columns=columns)


def per_seed_table(scores: pd.DataFrame) -> pd.DataFrame:
    """rows x (column, seed) of the points, for the CSV next to the interval table."""
    return scores.pivot_table(index="row", columns=["column", "seed"], values="value", sort=False)


# ------------------------------------------------------------------------------ paired tests


def _column_task(table: ComparisonTable, column: str) -> tuple[str, str]:
    found = next((c for c in table.columns if c.title == column), None)
    if found is None:
        raise ConfigError(f"{table.experiment}: no column {column!r}")
    return found.task, found.metric


def _samples(store: ResultStore, replicates: Replicates, seed: int, label: str) -> list[dict]:
    results = replicates.results[seed]
    return source.samples_by_label(store, results[results["label"] == label]).get(label, [])


def corpus_items(samples: list[dict], task: str, metric: str) -> pd.Series:
    """doc_id -> the (reference, hypothesis) item a corpus metric aggregates; empty if none."""
    items = {doc_id: tuple(value) for doc_id, value in metric_values(samples, task, metric)
             if isinstance(value, (list, tuple)) and len(value) == 2}
    return pd.Series(items, dtype=object)


def corpus_paired_bootstrap(pairs: Sequence[tuple[pd.Series, pd.Series]], score: Callable[[list], float],
                            resamples: int = CORPUS_RESAMPLES, seed: int = 0) -> PairedTest:
    """Koehn's paired bootstrap over several seeds: per seed (merge items, baseline items) on
    the same documents; the statistic is the mean over seeds of score(merge) - score(baseline)."""
    rng = np.random.default_rng(seed)
    aligned = []
    for merge, baseline in pairs:
        shared = merge.index.intersection(baseline.index)
        aligned.append((list(merge.loc[shared]), list(baseline.loc[shared])))
    if not aligned or not all(m for m, _ in aligned):
        raise ValueError("no paired documents")

    def difference(picks: list[np.ndarray | None]) -> float:
        values = []
        for (merge, baseline), pick in zip(aligned, picks):
            chosen = range(len(merge)) if pick is None else pick
            values.append(score([merge[i] for i in chosen]) - score([baseline[i] for i in chosen]))
        return float(np.mean(values))

    observed = difference([None] * len(aligned))
    means = np.array([difference([rng.integers(0, len(m), len(m)) for m, _ in aligned])
                      for _ in range(resamples)])
    tail = min((means <= 0).mean(), (means >= 0).mean())
    p_value = 1.0 if observed == 0 and not means.any() else min(1.0, max(2 * tail, 1 / resamples))
    low, high = np.percentile(means, [2.5, 97.5])
    return PairedTest(observed, float(low), float(high), float(p_value), sum(len(m) for m, _ in aligned))


def pooled_paired_test(store: ResultStore, replicates: Replicates, row: str, baseline: str, column: str,
                       corpus_scores: Mapping[str, Callable[[list], float]]) -> PairedTest | None:
    """`row` against `baseline` on one task column, pooled over the seeds (module docstring), in
    points; None when a seed lacks either row or its samples."""
    per_doc, corpus = [], []
    task = metric = ""
    for seed, table in replicates.tables.items():
        labels = replicates.labels(seed)
        if row not in labels or baseline not in labels:
            return None
        task, metric = _column_task(table, column)
        merge_samples, base_samples = (_samples(store, replicates, seed, labels[r]) for r in (row, baseline))
        merge, base = sample_scores(merge_samples, task, metric), sample_scores(base_samples, task, metric)
        if not merge.empty and not base.empty:
            shared = merge.index.intersection(base.index)
            per_doc.append((merge.loc[shared].to_numpy(), base.loc[shared].to_numpy()))
            continue
        merge, base = corpus_items(merge_samples, task, metric), corpus_items(base_samples, task, metric)
        if merge.empty or base.empty:
            return None
        corpus.append((merge, base))
    scale = points_per_unit(metric)
    if per_doc and not corpus:
        merged, baselines = (np.concatenate([pair[i] for pair in per_doc]) for i in (0, 1))
        test = paired_bootstrap(merged, baselines, resamples=RESAMPLES)
        return _in_points(test, scale)
    if corpus and not per_doc and metric.partition(",")[0] in corpus_scores:
        return _in_points(corpus_paired_bootstrap(corpus, corpus_scores[metric.partition(",")[0]]), 1.0)
    return None


def _in_points(test: PairedTest, scale: float) -> PairedTest:
    return PairedTest(test.difference * scale, test.low * scale, test.high * scale, test.p_value,
                      test.documents)
