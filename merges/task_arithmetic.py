"""Task arithmetic and its sparsified / sign-consensus variants: TIES, DARE, Breadcrumbs, DELLA.

All are one routine (as in mergekit's generalized task arithmetic), configured by a sparsifier
and an optional sign consensus:

    tau_t   = theta_t - theta_0                                  (task vectors)
    tau_t'  = sparsify(tau_t)                                    (none | top-k | DARE | ...)
    m       = elect_sign(w_t * tau_t')   if consensus else 1     (TIES sign election)
    delta   = sum_t m_t w_t tau_t' / (sum_t m_t w_t  if normalize else 1)
    theta   = theta_0 + lambda * delta

Papers: Task Arithmetic (Ilharco et al., 2023, arXiv:2212.04089); TIES (Yadav et al., 2023,
arXiv:2306.01708); DARE (Yu et al., 2024, arXiv:2311.03099); Model Breadcrumbs (Davari & Belilovsky,
2024, arXiv:2312.06795); DELLA (Deep et al., 2024, arXiv:2406.11617).
Symbols -> parameters: lambda -> `lambda`, w_t -> `weight`, keep fraction -> `density`, the
Breadcrumbs outlier fraction -> `gamma`, DELLA's probability spread -> `epsilon`.
Deviation: DARE's rescale defaults to the paper's 1/density; configs in mergekit's format default
to mergekit's L1-norm-preserving rescale (`rescale_norm: l1`), which equals 1/density in expectation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch
from pydantic import Field, model_validator

from merge_harness.merges.base import MergeMethod, Params
from merge_harness.merges.sparsify import (
    RescaleNorm,
    rescale,
    sparsify_magnitude,
    sparsify_magprune,
    sparsify_outliers,
    sparsify_random,
)
from merge_harness.merges.task_vectors import (
    broadcast_weights,
    consensus_merge,
    task_vectors,
    weighted_task_sum,
)

# ------------------------------------------------------------------------------------ parameters


class TaskArithmeticParams(Params):
    lambda_: float = Field(1.0, alias="lambda", description="scale of the merged task vector")
    normalize: bool = Field(False, description="divide by the sum of the weights")
    int8_mask: bool = Field(False, description="accepted for mergekit configs; no effect here")


class SparseParams(TaskArithmeticParams):
    rescale: bool = Field(False, description="scale kept entries back up after dropping")
    rescale_norm: RescaleNorm = Field("inverse_density", description="l1 | inverse_density")


class TiesParams(SparseParams):
    normalize: bool = True


class DareParams(SparseParams):
    rescale: bool = True


class DellaParams(SparseParams):
    normalize: bool = True
    rescale: bool = True


class DellaLinearParams(SparseParams):
    rescale: bool = True


class WeightParams(Params):
    weight: float = Field(1.0, description="w_t, this model's weight")


class DensityParams(WeightParams):
    density: float = Field(1.0, gt=0, le=1, description="fraction of tau_t entries kept")


class BreadcrumbsParams(DensityParams):
    """`gamma` shrinks when density + gamma > 1 so that `density` is always kept (as mergekit)."""

    gamma: float = Field(0.01, ge=0, lt=1, description="fraction of largest entries dropped")


class DellaModelParams(DensityParams):
    epsilon: float = Field(0.15, ge=0, lt=0.5, description="spread of keep-probabilities")

    @model_validator(mode="after")
    def _fits(self) -> DellaModelParams:
        if self.density < 1 and not (0 < self.density - self.epsilon < self.density + self.epsilon < 1):
            raise ValueError(f"density +/- epsilon must lie in (0, 1), got {self.density} +/- {self.epsilon}")
        return self


# ------------------------------------------------------------------------------------ the routine

Sparsifier = Callable[[torch.Tensor, DensityParams, torch.Generator], torch.Tensor]


def magnitude(tau: torch.Tensor, p: DensityParams, g: torch.Generator) -> torch.Tensor:
    return sparsify_magnitude(tau, p.density)


def random_drop(tau: torch.Tensor, p: DensityParams, g: torch.Generator) -> torch.Tensor:
    return sparsify_random(tau, p.density, g)


def outliers(tau: torch.Tensor, p: BreadcrumbsParams, g: torch.Generator) -> torch.Tensor:
    return sparsify_outliers(tau, p.density, p.gamma)


def magprune(tau: torch.Tensor, p: DellaModelParams, g: torch.Generator) -> torch.Tensor:
    return sparsify_magprune(tau, p.density, p.epsilon, g)


@dataclass(frozen=True)
class Recipe:
    sparsifier: Sparsifier | None
    consensus: Literal["sum", "count"] | None


def generalized_task_arithmetic(
    base: torch.Tensor | None,
    tensors: Sequence[torch.Tensor],
    model_params: Sequence[WeightParams],
    params: TaskArithmeticParams,
    generator: torch.Generator,
    *,
    recipe: Recipe,
) -> torch.Tensor:
    assert base is not None
    if recipe.sparsifier is None and recipe.consensus is None:
        return _task_arithmetic(base, tensors, [p.weight for p in model_params], params)
    deltas = task_vectors(base, tensors)  # (T, *S)
    if recipe.sparsifier is not None:
        for index, p in enumerate(model_params):
            sparse = recipe.sparsifier(deltas[index], p, generator)
            if params.rescale and p.density < 1:
                sparse = rescale(sparse, deltas[index], p.density, params.rescale_norm)
            deltas[index] = sparse
    weights = broadcast_weights([p.weight for p in model_params], deltas)  # (T, 1, ...)
    if recipe.consensus is not None:  # elect_sign + disjoint_merge, block by block
        return _finish(consensus_merge(deltas, weights, recipe.consensus, params.normalize), base, params)
    deltas *= weights
    return _finish(deltas.sum(dim=0), base, params, weights.sum() if params.normalize else None)


def _task_arithmetic(
    base: torch.Tensor, tensors: Sequence[torch.Tensor], weights: list[float], params: TaskArithmeticParams
) -> torch.Tensor:
    """The plain case, streamed: no (T, *S) stack of task vectors is built."""
    merged = weighted_task_sum(base, tensors, weights)
    return _finish(merged, base, params, sum(weights) if params.normalize else None)


def _finish(
    merged: torch.Tensor,
    base: torch.Tensor,
    params: TaskArithmeticParams,
    total: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """The shared tail: divide by the `total` weight when normalizing (a zero total leaves the
    sum as it is), scale by lambda, add theta_0 in place (one tensor less at peak)."""
    if total is not None:
        merged /= total if abs(total) >= 1e-8 else 1.0
    if params.lambda_ != 1:
        merged *= params.lambda_
    return merged.add_(base)


def variant(
    name: str,
    *,
    description: str,
    paper: str,
    params: type[TaskArithmeticParams],
    model_params: type[WeightParams],
    sparsifier: Sparsifier | None = None,
    consensus: Literal["sum", "count"] | None = None,
    random: bool = False,
) -> MergeMethod:
    """One member of the family: the routine with its sparsifier and sign consensus."""
    return MergeMethod(
        name=name,
        description=description,
        paper=paper,
        equation="theta_0 + lambda * sum_t m_t w_t sparsify(theta_t - theta_0) [/ sum_t m_t w_t]",
        params=params,
        model_params=model_params,
        random=random,
        elementwise=sparsifier is None and consensus is None,  # plain task arithmetic
        merge_tensor=partial(generalized_task_arithmetic, recipe=Recipe(sparsifier, consensus)),
    )


METHODS = (
    variant(
        "task_arithmetic",
        description="theta_0 + lambda * sum of weighted task vectors",
        paper="arXiv:2212.04089",
        params=TaskArithmeticParams,
        model_params=WeightParams,
    ),
    variant(
        "ties",
        description="trim to top-density magnitudes, elect signs, disjoint mean",
        paper="arXiv:2306.01708",
        params=TiesParams,
        model_params=DensityParams,
        sparsifier=magnitude,
        consensus="sum",
    ),
    variant(
        "dare_linear",
        description="random drop (keep prob. density), rescale, weighted sum",
        paper="arXiv:2311.03099",
        params=DareParams,
        model_params=DensityParams,
        sparsifier=random_drop,
        random=True,
    ),
    variant(
        "dare_ties",
        description="random drop and rescale, then TIES sign election",
        paper="arXiv:2311.03099",
        params=DareParams,
        model_params=DensityParams,
        sparsifier=random_drop,
        consensus="sum",
        random=True,
    ),
    variant(
        "breadcrumbs",
        description="drop the largest gamma and the smallest entries, weighted sum",
        paper="arXiv:2312.06795",
        params=SparseParams,
        model_params=BreadcrumbsParams,
        sparsifier=outliers,
    ),
    variant(
        "breadcrumbs_ties",
        description="breadcrumbs sparsification with TIES sign election",
        paper="arXiv:2312.06795",
        params=SparseParams,
        model_params=BreadcrumbsParams,
        sparsifier=outliers,
        consensus="sum",
    ),
    variant(
        "della",
        description="magnitude-ranked random drop, rescale, TIES sign election",
        paper="arXiv:2406.11617",
        params=DellaParams,
        model_params=DellaModelParams,
        sparsifier=magprune,
        consensus="sum",
        random=True,
    ),
    variant(
        "della_linear",
        description="magnitude-ranked random drop, rescale, weighted sum",
        paper="arXiv:2406.11617",
        params=DellaLinearParams,
        model_params=DellaModelParams,
        sparsifier=magprune,
        random=True,
    ),
)
