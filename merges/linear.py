"""Linear merge (model soup): a weighted average of whole models.

Paper: Wortsman et al., "Model soups", 2022 (arXiv:2203.05482).
Equation: theta = sum_i w_i theta_i / sum_i w_i  (without `normalize`: sum_i w_i theta_i).
The base model plays no special role: list every model to average under `models:`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field

from merge_harness.merges.base import MergeMethod, Params
from merge_harness.merges.task_arithmetic import WeightParams


class LinearParams(Params):
    normalize: bool = Field(True, description="divide by the sum of the weights")


def linear(
    base: torch.Tensor | None,
    tensors: Sequence[torch.Tensor],
    model_params: Sequence[WeightParams],
    params: LinearParams,
    generator: torch.Generator,
) -> torch.Tensor:
    dtype = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    result = torch.zeros(tensors[0].shape, dtype=dtype, device=tensors[0].device)
    for tensor, p in zip(tensors, model_params):
        result.add_(tensor.to(dtype), alpha=p.weight)
    if params.normalize:
        total = sum(p.weight for p in model_params)
        if total == 0:
            raise ValueError("weights sum to 0, so normalize=true cannot divide by them")
        result /= total
    return result


METHOD = MergeMethod(
    name="linear",
    description="weighted average of the listed models",
    paper="arXiv:2203.05482",
    equation="sum_i w_i theta_i / sum_i w_i",
    params=LinearParams,
    model_params=WeightParams,
    base_role="unused",
    min_models=1,
    elementwise=True,
    merge_tensor=linear,
)
