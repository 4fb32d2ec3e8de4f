"""RAM and RAM+: Reinforced Agent Merging, which averages shared updates and keeps unique ones.

Paper: Yuan et al., "Behavior Knowledge Merge in Reinforced Agentic Models", 2026
(arXiv:2601.13572). RL fine-tuning changes few parameters, and different tasks change different
ones, so averaging every entry over all T models dilutes each model's own updates. Per entry, with
tau_t = theta_t - theta_0 and an entry "updated" by model t when |tau_t| > epsilon:

    u_t = [|tau_t| > epsilon],   c = sum_t u_t                      (how many models updated it)
    RAM:   theta = theta_0 + sum_t u_t tau_t / max(c, 1)            (shared: mean; unique: kept)
    RAM+:  theta = theta_0 + sum_t u_t tau_t ([c == 1] lambda_t + [c > 1] / c)
           rho_t    = #{u_t, c > 1} / max(#{u_t, c == 1}, epsilon)  (model t's shared : unique)
           lambda_t = 1 + r * clamp(rho_t, 0, alpha)                (unique updates scaled up)

Entries no model updated (c = 0) keep theta_0, even where |tau_t| is non-zero but <= epsilon.
Symbols -> parameters (all method-wide): epsilon -> `epsilon`, r -> `r`, alpha -> `alpha`.
`ramplus_tl` is mergekit's tensor-local RAM+: the counts in rho_t are taken within each tensor.
Deviation: where model t has no unique entry its lambda_t multiplies nothing; we leave it out, so
epsilon = 0 gives a finite merge where mergekit's 0/0 gives NaN.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field

from merge_harness.merges.base import MergeMethod, NoParams, Params
from merge_harness.merges.task_vectors import task_vectors


class RamParams(Params):
    epsilon: float = Field(1e-5, ge=0, description="|tau_t| above which model t counts as updating an entry")


class RamPlusParams(RamParams):
    r: float = Field(0.1, description="strength of the rescaling of unique updates")
    alpha: float = Field(0.2, ge=0, description="cap on the shared-to-unique ratio rho_t")


def updated_entries(deltas: torch.Tensor, epsilon: float) -> tuple[torch.Tensor, torch.Tensor]:
    """u_t = abs(tau_t) > epsilon for a (T, n) stack, and c, the count of models updating each entry (n,)."""
    updated = deltas.abs() > epsilon
    return updated, updated.sum(dim=0)


def ram(
    base: torch.Tensor | None,
    tensors: Sequence[torch.Tensor],
    model_params: Sequence[NoParams],
    params: RamParams,
    generator: torch.Generator,
) -> torch.Tensor:
    assert base is not None
    deltas = task_vectors(base, tensors).reshape(len(tensors), -1)  # (T, n)
    updated, count = updated_entries(deltas, params.epsilon)
    merged = (deltas * updated).sum(dim=0) / count.clamp(min=1)  # a unique update is divided by 1
    return merged.reshape(base.shape).add_(base.to(merged.dtype))


def unique_scale(updated: torch.Tensor, count: torch.Tensor, params: RamPlusParams) -> torch.Tensor:
    """lambda_t = 1 + r * clamp(rho_t, 0, alpha), shape (T, 1); rho_t counted within this tensor."""
    shared = (updated & (count > 1)).sum(dim=1)  # (T,)
    unique = (updated & (count == 1)).sum(dim=1)  # (T,)
    rho = shared / unique.clamp(min=params.epsilon)
    rho = torch.where(unique > 0, rho, 0.0)  # no unique entry: lambda_t multiplies nothing
    return (1 + params.r * rho.clamp(min=0, max=params.alpha)).unsqueeze(1)


def ramplus_tl(
    base: torch.Tensor | None,
    tensors: Sequence[torch.Tensor],
    model_params: Sequence[NoParams],
    params: RamPlusParams,
    generator: torch.Generator,
) -> torch.Tensor:
    assert base is not None
    deltas = task_vectors(base, tensors).reshape(len(tensors), -1)  # (T, n)
    updated, count = updated_entries(deltas, params.epsilon)
    scale = unique_scale(updated, count, params)  # (T, 1)
    per_entry = torch.where(count == 1, scale, 1 / count.clamp(min=1).to(deltas.dtype))  # (T, n)
    merged = (deltas * updated * per_entry).sum(dim=0)
    return merged.reshape(base.shape).add_(base.to(merged.dtype))


METHODS = (
    MergeMethod(
        name="ram",
        description="mean of the models that updated each entry; unique updates kept whole",
        paper="arXiv:2601.13572",
        equation="theta_0 + sum_t u_t tau_t / max(c, 1), u_t = abs(tau_t) > eps, c = sum_t u_t",
        params=RamParams,
        merge_tensor=ram,
    ),
    MergeMethod(
        name="ramplus_tl",
        description="RAM with unique updates scaled by each model's shared:unique ratio (per tensor)",
        paper="arXiv:2601.13572",
        equation="theta_0 + sum_t u_t tau_t ([c=1] (1 + r clamp(rho_t, 0, alpha)) + [c>1] / c)",
        params=RamPlusParams,
        merge_tensor=ramplus_tl,
    ),
)
