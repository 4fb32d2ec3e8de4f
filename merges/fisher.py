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
from merge_harness.merges.model_level import CalibratedParams, CalibrationInputs, ModelMerge, average


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
    """Accumulate sum_t (F_t + eps) theta_t and sum_t (F_t + eps), one fine-tune at a time.

    Accumulators are float32 (two model-sized buffers), so memory stays ~3x the model.
    """
    names = inputs.tensor_names()
    count = len(inputs.tasks)
    numerator: dict[str, torch.Tensor] = {}
    denominator: dict[str, torch.Tensor] = {}
    for k in range(count):
        fisher = inputs.squared_gradients(k)
        for name in names:
            value = inputs.read(k, name)
            weight = fisher[name] + params.epsilon if name in fisher else torch.ones_like(value)
            numerator[name] = numerator.get(name, 0) + weight * value
            denominator[name] = denominator.get(name, 0) + weight
        del fisher
    state = {}
    for name in names:
        total = denominator.pop(name)
        merged = numerator.pop(name) / torch.where(total > 0, total, 1.0)
        if not bool((total > 0).all()):  # eps = 0 and no gradient anywhere: the plain mean
            plain = average([inputs.read(k, name) for k in range(count)])
            merged = torch.where(total > 0, merged, plain)
        state[name] = merged
    return ModelMerge(state)


METHOD = MergeMethod(
    name="fisher",
    description="elementwise average weighted by each fine-tune's diagonal Fisher",
    paper="arXiv:2111.09832",
    equation="theta = sum_t (F_t + eps) theta_t / sum_t (F_t + eps)",
    params=FisherParams,
    base_role="optional",
    merge_model=merge_fisher,
)
