"""Coefficient search: pick a merge method's scalar parameter on held-out *train* data.

The protocol of Ilharco et al. (2023), followed by Jin et al. (ICLR 2025, seed 002): evaluate
task arithmetic's scaling coefficient on the grid {0.0, 0.05, ..., 1.0} and keep the value with
the highest target metric on a small held-out part of the training data, never on the test
split. Any scalar parameter of any registered method can be searched the same way (TIES's
`density`, DARE's `lambda`, ...): each grid value is merged in memory (`merge_state_dict`) and
scored.

Score of a merged model on task t: the chosen `metric` (`merge_harness.selection.answers`) on N
examples of task t's held-out data, computed from the logits (no lm-eval, no generation):
`log_likelihood` (default; mean log-probability per answer token, smooth even on a few
examples) or `exact_match` (teacher-forced: every answer token is the greedy prediction).
Selection maximises the unweighted mean over tasks; ties go to the smallest value.

Before a single row is read, `merge_harness.selection.splits.check_selection_data` refuses every
source that is (or looks like) test data, calibration sources included.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from merge_harness.core.errors import ConfigError
from merge_harness.io.models import build_model, load_tokenizer
from merge_harness.merge.config import MergeConfig
from merge_harness.merge.engine import merge_state_dict
from merge_harness.merges.model_level import statistics_reuse
from merge_harness.selection.answers import METRICS, AnswerBatch, DataSettings, answer_batch, answer_scores
from merge_harness.selection.grid import DEFAULT_GRID
from merge_harness.selection.splits import check_selection_data


@dataclass(frozen=True)
class SearchSpec:
    """What to search: `parameter` of `method` over `grid`, the other parameters `fixed`."""

    method: str = "task_arithmetic"
    parameter: str = "lambda"
    grid: tuple[float, ...] = DEFAULT_GRID
    metric: str = "log_likelihood"
    fixed: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, str] = field(default_factory=dict)  # task -> source, for slta/regmean/fisher


@dataclass(frozen=True)
class SearchPoint:
    value: float
    scores: dict[str, float]  # task -> metric on its held-out data
    mean: float


@dataclass(frozen=True)
class CoefficientSearch:
    """The outcome, to store with the merge result: the chosen value, the curve, the data used."""

    method: str
    parameter: str
    metric: str
    chosen: float
    best_score: float
    curve: tuple[SearchPoint, ...]
    selection_data: dict[str, str]  # task -> held-out source (train split)
    data: DataSettings

    def to_record(self) -> dict[str, Any]:
        """JSON-safe dict (e.g. for the result store)."""
        record = asdict(self)
        record["curve"] = [asdict(point) for point in self.curve]
        return record

    def frame(self) -> pd.DataFrame:
        """Long form: value, task (and 'mean'), score."""
        rows = [{"value": p.value, "task": t, "score": s} for p in self.curve for t, s in p.scores.items()]
        rows += [{"value": p.value, "task": "mean", "score": p.mean} for p in self.curve]
        return pd.DataFrame(rows)


def grid_search(
    score: Callable[[float], Mapping[str, float]], grid: Sequence[float]
) -> tuple[float, list[SearchPoint]]:
    """Score every grid value ({task: metric}); the value with the best mean (ties: smallest)."""
    curve = []
    for value in sorted(grid):
        scores = dict(score(value))
        curve.append(SearchPoint(float(value), scores, sum(scores.values()) / len(scores)))
    best = max(curve, key=lambda p: (p.mean, -p.value))
    return best.value, curve


def held_out_score(model, batch: AnswerBatch, metric: str, batch_size: int = 8) -> float:
    """The metric of `model` on a task's held-out batch (see the module docstring)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for chunk in batch.chunks(batch_size):
            out = model(input_ids=chunk.input_ids, attention_mask=chunk.attention_mask, use_cache=False)
            value, n = answer_scores(out.logits, chunk)[metric]
            total, count = total + value, count + n
    return total / max(count, 1)


def merge_config(
    base,
    finetunes: Mapping[str, str | Path],
    spec: SearchSpec,
    value: float,
    data: DataSettings = DataSettings(),
) -> MergeConfig:
    """The merge at one grid value (calibrated methods get `spec.calibration`, rendered like `data`)."""
    models = [
        {
            "model": str(path),
            **({"calibration": str(spec.calibration[task])} if task in spec.calibration else {}),
        }
        for task, path in finetunes.items()
    ]
    calibration = {"template": data.template, "max_length": data.max_length, "batch_size": data.batch_size}
    return MergeConfig(
        method=spec.method,
        base_model=str(base),
        models=models,
        parameters={**spec.fixed, spec.parameter: value},
        calibration=calibration,
    )


def search_coefficient(
    base: str | Path,
    finetunes: Mapping[str, str | Path],
    held_out: Mapping[str, str | Path],
    spec: SearchSpec = SearchSpec(),
    data: DataSettings = DataSettings(),
    forbidden: Sequence[str | Path] = (),
    config_at: Callable[[float], MergeConfig] | None = None,
) -> CoefficientSearch:
    """Grid-search `spec.parameter`; held_out: task -> held-out train data (JSONL or task name).

    `forbidden`: evaluation files to refuse besides the built-in rules (e.g. a zoo's test_data).
    `config_at`: the merge at a grid value (default: `merge_config` of the arguments), e.g. a run's
    own config with the searched parameter replaced, so the search merges what the run will.
    """
    config_at = config_at or (lambda value: merge_config(base, finetunes, spec, value, data))
    if spec.metric not in METRICS:
        raise ConfigError(f"search metric {spec.metric!r} is not one of {', '.join(METRICS)}")
    missing = sorted(set(finetunes) - set(held_out))
    if missing:
        raise ConfigError(f"held-out data missing for task(s) {missing}")
    check_selection_data([*(held_out[t] for t in finetunes), *spec.calibration.values()], forbidden)
    tokenizer = load_tokenizer(base)
    batches = {task: answer_batch(held_out[task], tokenizer, data) for task in finetunes}

    def score(value: float) -> dict[str, float]:
        outcome = merge_state_dict(config_at(value))
        model = build_model(outcome.model_config, outcome.state)
        return {
            task: held_out_score(model, batch, spec.metric, data.batch_size)
            for task, batch in batches.items()
        }

    with statistics_reuse():  # calibration statistics once for the whole grid (e.g. SLTA's scale)
        chosen, curve = grid_search(score, spec.grid)
    best = next(p.mean for p in curve if p.value == chosen)
    return CoefficientSearch(
        spec.method,
        spec.parameter,
        spec.metric,
        chosen,
        best,
        tuple(curve),
        {t: str(held_out[t]) for t in finetunes},
        data,
    )
