"""RegMean: merge each linear layer in closed form so it matches every fine-tune on its own inputs.

Paper: Jin et al., "Dataless Knowledge Fusion by Merging Weights of Language Models", ICLR 2023
(arXiv:2212.09849). For a linear layer y = W x (torch layout, W is (d_out, d_in)) and the inputs
X_t (n_t, d_in) fine-tune t's layer sees on its own calibration data:

    min_W  sum_t || X_t W^T - X_t W_t^T ||^2   =>   W = (sum_t W_t G_t) (sum_t G_t)^-1,
    G_t = X_t^T X_t                               (Gram matrix of the inputs, d_in x d_in)

With `alpha` < 1 the off-diagonal entries of every G_t are scaled by alpha (the paper's fix for
few examples: G~ = alpha * G + (1 - alpha) * diag(G)); alpha = 1 is the exact least-squares
solution. Symbols -> parameters: alpha -> `alpha`, examples per task -> `num_samples`.
Everything that is not a linear layer inside a decoder layer (embeddings, norms, lm_head, and
the biases of linear layers) is the plain average of the fine-tunes, as in the paper.
Deviations: alpha defaults to 0.9 (the paper tunes it; MergeLM/FusionBench default to 1.0);
when sum_t G~_t is singular (an input never active), the pseudo-inverse is used with a warning.
The base model is not used: RegMean merges the fine-tunes themselves.
"""

from __future__ import annotations

import logging
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

logger = logging.getLogger(__name__)


class RegMeanParams(CalibratedParams):
    alpha: float = Field(0.9, ge=0, le=1, description="scale of the off-diagonal Gram entries")


def scale_off_diagonal(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha * G + (1 - alpha) * diag(G): diagonal kept, off-diagonal entries times alpha."""
    if alpha == 1:
        return gram
    return alpha * gram + (1 - alpha) * torch.diag(torch.diagonal(gram))


def regmean_linear(
    weights: Sequence[torch.Tensor], grams: Sequence[torch.Tensor], alpha: float = 1.0, name: str = ""
) -> torch.Tensor:
    """W = (sum_t W_t G~_t)(sum_t G~_t)^-1 for weights (d_out, d_in) and grams (d_in, d_in)."""
    scaled = [scale_off_diagonal(g.to(torch.float64), alpha) for g in grams]
    lhs = torch.stack(scaled).sum(dim=0)  # (d_in, d_in), symmetric
    rhs = sum(g @ w.to(torch.float64).T for g, w in zip(scaled, weights))  # (d_in, d_out)
    try:
        solution = torch.linalg.solve(lhs, rhs)
    except RuntimeError:
        logger.warning("regmean: Gram sum of %s is singular; using its pseudo-inverse", name or "a layer")
        solution = torch.linalg.pinv(lhs) @ rhs
    return solution.T.to(weights[0].dtype)


def merge_regmean(inputs: CalibrationInputs, params: RegMeanParams) -> ModelMerge:
    """Linear layers solved layer by layer as their Grams stream in; every other tensor is
    averaged when the engine takes it."""
    count = len(inputs.tasks)
    merged: dict[str, torch.Tensor] = {}
    for layer in inputs.input_grams():
        for name, grams in layer.grams.items():
            weights = [inputs.read(k, name) for k in range(count)]
            merged[name] = regmean_linear(weights, grams, params.alpha, name)

    def make(name: str) -> torch.Tensor:
        return merged[name] if name in merged else average(FineTuneTensors(inputs, name))

    return ModelMerge(LazyState(inputs.tensor_names(), make, lambda name: merged.pop(name, None)))


METHOD = MergeMethod(
    name="regmean",
    description="closed-form least-squares merge of linear layers from input Gram matrices",
    paper="arXiv:2212.09849",
    equation="W = (sum_t W_t G_t)(sum_t G_t)^-1, G_t = X_t^T X_t (off-diagonals * alpha)",
    params=RegMeanParams,
    base_role="optional",
    merge_model=merge_regmean,
)
