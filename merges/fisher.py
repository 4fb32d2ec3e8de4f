"""Fisher merging: a per-parameter weighted average, weighted by each model's diagonal Fisher.

Paper: Matena & Raffel, "Merging Models with Fisher-Weighted Averaging", NeurIPS 2022
(arXiv:2111.09832). For fine-tunes theta_t with diagonal Fisher information F_t:

    theta = sum_t (F_t + eps) theta_t / sum_t (F_t + eps)          (elementwise)

F_t is the empirical Fisher of fine-tune t on its own task's calibration examples d:
F_t = mean_d (d/dtheta log p(d; theta_t))^2, log p(d) = sum of the log-probabilities of the
example's tokens (padding excluded). Symbols -> parameters: eps -> `epsilon`, number of examples
-> `num_samples`.
Deviations: the empirical Fisher (labels = the calibration text) rather than labels sampled from
the model; tensors without a gradient (none in Llama-family models) are plainly averaged.
Equal Fishers give the plain average; the base model is not used.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field

from merge_harness.merges.base import MergeMethod
from merge_harness.merges.model_level import (
    CalibratedParams,
    CalibrationInputs,
    FineTuneTensors,
    LazyState,
    ModelMerge,
    average,
)


class FisherParams(CalibratedParams):
    epsilon: float = Field(1e-8, ge=0, description="added to every Fisher value (a floor)")


def fisher_average(
    tensors: Sequence[torch.Tensor], fishers: Sequence[torch.Tensor], epsilon: float = 1e-8
) -> torch.Tensor:
    """sum_t (F_t + eps) theta_t / sum_t (F_t + eps); the plain mean where all weights are 0."""
    weights = torch.stack([f.to(torch.float64) + epsilon for f in fishers])  # (T, *S)
    values = torch.stack([t.to(torch.float64) for t in tensors])
    total = weights.sum(dim=0)
    weighted = (weights * values).sum(dim=0) / torch.where(total > 0, total, 1.0)
    merged = torch.where(total > 0, weighted, values.mean(dim=0))
    return merged.to(tensors[0].dtype)


def merge_fisher(inputs: CalibrationInputs, params: FisherParams) -> ModelMerge:
    """Accumulate sum_t (F_t + eps) theta_t and sum_t (F_t + eps) in place, one fine-tune at a time.

    The accumulators are float32, two model-sized buffers; while fine-tune t's Fisher is made,
    its network and F_t exist besides them (about 4x the model). Each merged tensor is the ratio
    of its two sums, made when the engine takes it, which frees those sums.
    """
    names = inputs.tensor_names()
    numerator: dict[str, torch.Tensor] = {}
    denominator: dict[str, torch.Tensor] = {}
    for k in range(len(inputs.tasks)):
        fisher = inputs.squared_gradients(k)
        for name in names:
            value = inputs.read(k, name)
            weight = fisher.pop(name) + params.epsilon if name in fisher else torch.ones_like(value)
            if name in denominator:
                denominator[name].add_(weight)
                numerator[name].add_(weight.mul_(value))
            else:  # the first fine-tune starts each sum as 0 + x (as the sums always did)
                denominator[name] = 0 + weight
                numerator[name] = weight.mul_(value).add_(0)
        del fisher

    def make(name: str) -> torch.Tensor:
        total = denominator[name]
        merged = numerator[name] / torch.where(total > 0, total, 1.0)
        if not bool((total > 0).all()):  # eps = 0 and no gradient anywhere: the plain mean
            merged = torch.where(total > 0, merged, average(FineTuneTensors(inputs, name)))
        return merged

    def release(name: str) -> None:
        del numerator[name], denominator[name]

    return ModelMerge(LazyState(names, make, release))


METHOD = MergeMethod(
    name="fisher",
    description="elementwise average weighted by each fine-tune's diagonal Fisher",
    paper="arXiv:2111.09832",
    equation="theta = sum_t (F_t + eps) theta_t / sum_t (F_t + eps)",
    params=FisherParams,
    base_role="optional",
    merge_model=merge_fisher,
)
