"""SLERP: spherical linear interpolation between the base and one other model.

Reference: Shoemake, 1985; popularised for LLM merging by mergekit.
Equation, per tensor with a = theta_base, b = theta_other flattened, Omega = angle(a, b):
    slerp(a, b; t) = sin((1 - t) Omega) / sin(Omega) * a + sin(t Omega) / sin(Omega) * b
falling back to (1 - t) a + t b when a and b are (anti)parallel (|cos Omega| > 0.9995).
Symbols -> parameters: t -> `t` (0 gives the base, 1 the other model).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field

from merge_harness.merges.base import MergeMethod, NoParams, Params

DOT_THRESHOLD = 0.9995
EPS = 1e-8


class SlerpParams(Params):
    t: float = Field(ge=0, le=1, description="interpolation factor from base (0) to other (1)")


def slerp(
    base: torch.Tensor | None,
    tensors: Sequence[torch.Tensor],
    model_params: Sequence[NoParams],
    params: SlerpParams,
    generator: torch.Generator,
) -> torch.Tensor:
    assert base is not None
    dtype = torch.float64 if base.dtype == torch.float64 else torch.float32
    a, b, t = base.to(dtype).reshape(-1), tensors[0].to(dtype).reshape(-1), params.t
    norm_a, norm_b = torch.linalg.vector_norm(a), torch.linalg.vector_norm(b)
    norm_a = norm_a if norm_a > EPS else torch.ones_like(norm_a)
    norm_b = norm_b if norm_b > EPS else torch.ones_like(norm_b)
    cos_omega = torch.dot(a / norm_a, b / norm_b).clamp(-1, 1)
    if cos_omega.abs() > DOT_THRESHOLD:
        return ((1 - t) * a + t * b).reshape(base.shape)
    omega = torch.acos(cos_omega)
    sin_omega = torch.sin(omega)
    coef_a = torch.sin((1 - t) * omega) / sin_omega
    coef_b = torch.sin(t * omega) / sin_omega
    return (coef_a * a + coef_b * b).reshape(base.shape)


METHOD = MergeMethod(
    name="slerp",
    description="spherical interpolation between the base and one other model",
    paper="Shoemake 1985; mergekit",
    equation="sin((1-t)W)/sin(W) a + sin(tW)/sin(W) b",
    params=SlerpParams,
    min_models=1,
    max_models=1,
    merge_tensor=slerp,
)
