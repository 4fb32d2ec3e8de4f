"""How a merge's hyper-parameters are chosen, never on test data.

A method in an experiment gets its parameters one of three ways, and every report row says which:

- `set`: the values the experiment writes (or the method's defaults when it writes none);
- `held-out`: a `search:` block picks one scalar parameter on a held-out part of each fine-tune's
  *train* data before merging (the protocol of Ilharco et al., 2023, followed by seed 002: grid
  {0, 0.05, ..., 1}, best mean held-out score over tasks, ties to the smallest value). The job's
  key holds the search recipe, not the value; the value it chose is stored with the result;
- `oracle`: `oracle: true` on a grid reports only the grid point with the best average *test*
  score, labelled "oracle (picked on test)": an upper bound, not a method.

The search itself is `merge_harness.selection.search.search_coefficient` (held-out rows are guarded
by `merge_harness.selection.splits.check_selection_data`); this module holds only its settings.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

DEFAULT_GRID = tuple(round(0.05 * i, 2) for i in range(21))  # 0.0, 0.05, ..., 1.0
Chosen = Literal["set", "held-out", "oracle"]


class HeldOutSearch(BaseModel):
    """Choose `parameter` from `grid` on held-out train rows (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    parameter: str = "lambda"
    grid: tuple[float, ...] = Field(DEFAULT_GRID, min_length=1)
    metric: Literal["log_likelihood", "exact_match"] = "log_likelihood"
    held_out_fraction: float = Field(
        0.1, gt=0, lt=1, description="part of each fine-tune's train data held out for the search"
    )
    num_samples: int = Field(16, ge=1, description="held-out rows scored per task")
    seed: int = 0
    max_length: int = Field(256, ge=2)
    batch_size: int = Field(8, ge=1)
