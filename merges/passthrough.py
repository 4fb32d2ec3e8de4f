"""Passthrough: copy one model's tensor, optionally scaled (mergekit's `passthrough`).

With `slices:` it builds frankenmerges: each output slice takes layers from one model, so
layers can be stacked, repeated or interleaved, and the output's layer count is the sum of
the slices'. Equation: theta = scale * theta_m (scale unset: theta_m as it is).
Symbols -> parameters: scale -> per-model `scale`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field

from merge_harness.merges.base import MergeMethod, NoParams, Params


class PassthroughModelParams(Params):
    scale: float | None = Field(None, description="multiply the copied tensor by this (unset: copy as is)")


def passthrough(
    base: torch.Tensor | None,
    tensors: Sequence[torch.Tensor],
    model_params: Sequence[PassthroughModelParams],
    params: NoParams,
    generator: torch.Generator,
) -> torch.Tensor:
    (tensor,), (scale,) = tensors, [p.scale for p in model_params]
    return tensor if scale is None else tensor * scale


METHOD = MergeMethod(
    name="passthrough",
    description="copy one model's tensors (with slices: stack layers of several models)",
    paper="mergekit (Goddard et al., 2024, arXiv:2403.13257)",
    equation="scale * theta_m",
    model_params=PassthroughModelParams,
    base_role="unused",
    min_models=1,
    max_models=1,
    merge_tensor=passthrough,
)
