"""A worked third-party merge method: the element-wise median of the task vectors.

    theta = theta_0 + lambda * median_t(theta_t - theta_0)

Robust to one fine-tune that moved a weight far from the others. Installing this package
(`pip install ./examples/plugin`) makes `task_median` appear in `merge-harness methods`, because
pyproject.toml publishes `register` under the `merge_harness.methods` entry point group.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field

from merge_harness.merges.base import MergeMethod, NoParams, Params
from merge_harness.merges.task_vectors import task_vectors


class TaskMedianParams(Params):
    lambda_: float = Field(1.0, alias="lambda", description="scale of the median task vector")


def task_median(
    base: torch.Tensor | None,
    tensors: Sequence[torch.Tensor],
    model_params: Sequence[NoParams],
    params: TaskMedianParams,
    generator: torch.Generator,
) -> torch.Tensor:
    assert base is not None
    deltas = task_vectors(base, tensors)  # (T, *S)
    return base.to(deltas.dtype) + params.lambda_ * deltas.median(dim=0).values


def register(registry) -> None:
    registry.register(
        "task_median",
        MergeMethod(
            name="task_median",
            description="theta_0 + lambda * element-wise median of the task vectors",
            paper="example plugin",
            equation="theta_0 + lambda * median_t(tau_t)",
            params=TaskMedianParams,
            min_models=1,
            merge_tensor=task_median,
        ),
    )
