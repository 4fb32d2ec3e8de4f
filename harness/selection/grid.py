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
by `merge_harness.selection.splits.check_selection_data`); this module holds its settings, and
checks a grid against the method's parameter model (`check_grid`, `edge_warning`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from merge_harness.core.errors import ConfigError

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


def parameter_model(method: str, parameter: str) -> type[BaseModel]:
    """The parameter model of `method` (method-wide, else per model) that declares `parameter`."""
    from merge_harness.merge.methods import get_method

    found = get_method(method)
    for model in (found.params, found.model_params):
        if parameter in {field.alias or name for name, field in model.model_fields.items()}:
            return model
    names = [field.alias or name for model in (found.params, found.model_params)
             for name, field in model.model_fields.items()]
    raise ConfigError(f"{method} has no parameter {parameter!r} to search "
                      f"(its parameters: {', '.join(names) or 'none'})")


def value_problem(model: type[BaseModel], parameter: str, value: float) -> str | None:
    """Why `parameter = value` is invalid in `model` (its other fields at their defaults), or None."""
    try:
        model.model_validate({parameter: value})
    except ValidationError as exc:
        for error in exc.errors():
            if not error["loc"] or error["loc"][0] == parameter:
                return error["msg"][:1].lower() + error["msg"][1:]
    return None


def check_grid(method: str, parameter: str, grid: Sequence[float], where: str = "grid") -> None:
    """Refuse the first grid value the method's parameter model refuses, before any merge runs."""
    model = parameter_model(method, parameter)
    for value in grid:
        if problem := value_problem(model, parameter, value):
            raise ConfigError(f"{where}: {parameter} = {value:g} is not valid for {method}: {problem}")


def edge_warning(method: str, parameter: str, grid: Sequence[float], chosen: float) -> str | None:
    """A warning when `chosen` is the grid's smallest or largest value and the parameter can go
    further (a value past it, by a grid step or a sliver of one, is valid): the best value may
    lie outside the grid. None when it is not on the edge, or the edge is the parameter's bound."""
    values = sorted(set(grid))
    if len(values) < 2 or chosen not in (values[0], values[-1]):
        return None
    low = chosen == values[0]
    step = (values[1] - values[0]) if low else (values[-2] - values[-1])  # toward the grid
    model = parameter_model(method, parameter)
    if all(value_problem(model, parameter, chosen - part) for part in (step, step / 1000)):
        return None
    side, direction = ("smallest", "below") if low else ("largest", "above")
    return (f"chosen {parameter} = {chosen:g} is the grid's {side} value: the best may lie "
            f"{direction} it; widen the grid")
