"""NearSwap: take the other model's value where it is near the base's, move at most t elsewhere.

Reference: alchemonaut, "QuartetAnemoi-70B-t0.0001" model card (huggingface.co/alchemonaut), 2024,
as implemented in mergekit. Per entry, with a = theta_0 (the base) and b = theta_1:

    w     = clamp(t / max(|a - b|, 1e-6), 0, 1)
    theta = w * b + (1 - w) * a

Entries closer than t are swapped to b; farther ones move toward b by exactly t, so
theta = a + clamp(b - a, -t, t) (up to the 1e-6 floor, which matters only for t < 1e-6).
Symbols -> parameters: t -> `t` (method-wide, required; 0 gives the base). Exactly one model
besides the base.
Deviation: `t` must be >= 0 (mergekit accepts a negative t, which gives the base).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field

from merge_harness.merges.base import MergeMethod, NoParams, Params

MIN_DISTANCE = 1e-6


class NearSwapParams(Params):
    t: float = Field(ge=0, description="distance below which the other model's value is taken whole")


def nearswap(
    base: torch.Tensor | None,
    tensors: Sequence[torch.Tensor],
    model_params: Sequence[NoParams],
    params: NearSwapParams,
    generator: torch.Generator,
) -> torch.Tensor:
    assert base is not None
    dtype = torch.float64 if base.dtype == torch.float64 else torch.float32
    a, b = base.to(dtype), tensors[0].to(dtype)
    weight = (params.t / (a - b).abs().clamp(min=MIN_DISTANCE)).clamp(0, 1)
    return weight * b + (1 - weight) * a


METHOD = MergeMethod(
    name="nearswap",
    description="take the other model's value where it lies within t of the base's",
    paper="huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
    equation="w = clamp(t / abs(a - b), 0, 1); w b + (1 - w) a",
    params=NearSwapParams,
    min_models=1,
    max_models=1,
    merge_tensor=nearswap,
)
