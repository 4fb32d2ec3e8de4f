"""What a merge returns, from either engine (streaming or data-driven)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from merge_harness.core.results import Coefficient


@dataclass
class MergeOutcome:
    """What a merge produced: a state dict (in memory) or a directory (on disk), and its cost."""

    state: dict[str, torch.Tensor] | None
    out_dir: Path | None
    seconds: float
    tensors: int
    coefficients: list[Coefficient] = field(default_factory=list)
    model_config: dict = field(default_factory=dict)  # config.json of the merged model
    tokenizer_dir: Path | None = None  # where its tokenizer files come from
    # model-level methods: full-forward equivalents run, per "model@task" calibration set
    forward_passes: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # config keys accepted without effect (the plan's)
