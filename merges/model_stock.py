"""Model Stock: interpolate between the base and the average fine-tune by their angle.

Paper: Jang et al., "Model Stock: All we need is just a few fine-tuned models", 2024
(arXiv:2403.19522). With k fine-tunes and cos(theta) the mean pairwise cosine between their task
vectors:  t = k cos(theta) / (1 + (k - 1) cos(theta)),  theta = t * mean_i theta_i + (1 - t) theta_0.
`filter_wise` computes the angle per output row instead of per tensor. Where the denominator
vanishes the base is kept (no finite estimate exists).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field

from merge_harness.merges.base import MergeMethod, NoParams, Params


class ModelStockParams(Params):
    filter_wise: bool = Field(False, description="one angle per output row instead of per tensor")


def model_stock(
    base: torch.Tensor | None,
    tensors: Sequence[torch.Tensor],
    model_params: Sequence[NoParams],
    params: ModelStockParams,
    generator: torch.Generator,
) -> torch.Tensor:
    assert base is not None
    dtype = torch.float64 if base.dtype == torch.float64 else torch.float32
    w0 = base.to(dtype)
    rows = w0.reshape(w0.shape[0] if params.filter_wise and w0.dim() > 1 else 1, -1)
    offsets = [t.to(dtype).reshape(rows.shape) - rows for t in tensors]  # k x (R, N)
    cosines = []
    for i, first in enumerate(offsets):
        for second in offsets[i + 1 :]:
            norms = (first.norm(dim=-1) * second.norm(dim=-1)).clamp(min=1e-6)
            cosines.append(((first * second).sum(dim=-1) / norms).clamp(-1, 1))
    cos_theta = torch.stack(cosines).mean(dim=0).unsqueeze(-1)  # (R, 1)
    k = len(tensors)
    denominator = 1 + (k - 1) * cos_theta
    singular = denominator.abs() < 1e-6
    ratio = torch.where(singular, 0.0, k * cos_theta / torch.where(singular, 1.0, denominator))
    average = rows + sum(offsets) / k
    return (ratio * average + (1 - ratio) * rows).reshape(base.shape)


METHOD = MergeMethod(
    name="model_stock",
    description="interpolate base -> mean fine-tune by the fine-tunes' mutual angle",
    paper="arXiv:2403.19522",
    equation="t = k cos / (1 + (k-1) cos); t * mean(theta_i) + (1 - t) theta_0",
    params=ModelStockParams,
    min_models=2,
    merge_tensor=model_stock,
)
