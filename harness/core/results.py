"""Plain records that flow between evaluation, the store, the runner and the reports."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Score:
    """One metric of one task for one model, as lm-eval reported it (value in lm-eval's scale)."""

    task: str
    metric: str
    value: float
    stderr: float | None = None
    samples: int | None = None


@dataclass(frozen=True)
class Coefficient:
    """One solved merge coefficient: for `submodule` (e.g. "layers.3.mlp"), the weight of `task`."""

    submodule: str
    task: str
    value: float


@dataclass
class JobResult:
    """Everything one finished job produced; `key` is the content hash that identifies it."""

    key: str
    experiment: str
    model_label: str
    spec: dict[str, Any]
    scores: list[Score]
    coefficients: list[Coefficient] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    peak_rss_mb: float | None = None
    samples_log: list[dict[str, Any]] | None = None
