"""Is a merge really better than the baseline on a task? A paired bootstrap on per-sample scores.

Both models answered the same test documents, so the test is paired: resample the documents with
replacement (`resamples` times, a fixed seed) and look at the mean per-document difference
merge - baseline. The two-sided p-value is twice the smaller tail of that bootstrap
distribution around 0 (at least 1 / resamples); the 95% interval is its 2.5th and 97.5th
percentiles (Koehn, 2004; Efron & Tibshirani, 1993). Per-document scores come from lm-eval's
sample logs (`evaluation.log_samples: true`). Corpus-level metrics (BLEU, chrF) have no
per-document value and are not tested.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd

RESAMPLES = 10_000
ALPHA = 0.05


@dataclass(frozen=True)
class PairedTest:
    difference: float  # mean over documents of merge - baseline (the metric's own units)
    low: float  # 95% bootstrap interval of that mean
    high: float
    p_value: float
    documents: int

    @property
    def significant(self) -> bool:
        return self.p_value < ALPHA


def paired_bootstrap(merge: np.ndarray, baseline: np.ndarray, resamples: int = RESAMPLES,
                     seed: int = 0) -> PairedTest:
    """The paired test of two equally long arrays of per-document scores."""
    diffs = np.asarray(merge, dtype=float) - np.asarray(baseline, dtype=float)
    n = len(diffs)
    if n == 0:
        raise ValueError("no paired documents")
    rng = np.random.default_rng(seed)
    means = diffs[rng.integers(0, n, size=(resamples, n))].mean(axis=1)
    tail = min((means <= 0).mean(), (means >= 0).mean())
    p_value = 1.0 if not diffs.any() else min(1.0, max(2 * tail, 1 / resamples))
    low, high = np.percentile(means, [2.5, 97.5])
    return PairedTest(float(diffs.mean()), float(low), float(high), float(p_value), n)


def metric_values(samples: Iterable[dict], task: str, metric: str) -> Iterator[tuple[object, object]]:
    """(doc_id, the sample's value of `metric`) for `task`'s samples ("name,filter": that filter's)."""
    name, _, filter_name = metric.partition(",")
    for sample in samples:
        if sample.get("task") == task and not (filter_name and sample.get("filter") != filter_name):
            yield sample["doc_id"], (sample.get("metrics") or {}).get(name)


def sample_scores(samples: Iterable[dict], task: str, metric: str) -> pd.Series:
    """Per-document values of `metric` ("exact_match,strict-match": metric and filter) on `task`,
    indexed by doc_id; empty when the metric is corpus-level or absent."""
    values = {}
    for doc_id, value in metric_values(samples, task, metric):
        if isinstance(value, str):  # a JSON-encoded value, as some stores keep it
            value = json.loads(value)
        if not isinstance(value, (int, float)) or not math.isfinite(value):  # bools count as 0/1
            return pd.Series(dtype=float)
        values[doc_id] = float(value)
    return pd.Series(values, dtype=float)


def paired_test(merge: pd.Series, baseline: pd.Series, seed: int = 0) -> PairedTest | None:
    """The test on the documents both were scored on (None when they share none)."""
    shared = merge.index.intersection(baseline.index)
    if shared.empty:
        return None
    return paired_bootstrap(merge.loc[shared].to_numpy(), baseline.loc[shared].to_numpy(), seed=seed)
