"""SCE: Select, Calculate, Erase -- the task-vector merge of FuseChat.

Paper: Wan et al., "FuseChat: Knowledge Fusion of Chat Models", 2024 (arXiv:2408.07990).
With tau_t = theta_t - theta_0 for T models (shapes (*S)):

    Select     s      = top-k entries of Var_t(tau_t)  (population variance over the T models),
                        k = int(n_nonzero * select_topk); tau_t' = s * tau_t    (skipped at 1)
    Calculate  w_t    = mean(tau_t'^2) / sum_j mean(tau_j'^2)    (uniform 1/T when that sum < 1e-6)
    Erase      m_t    = [sign(tau_t') == sign(sum_j tau_j')]     (TIES sign election, "+" on a tie)
               theta  = theta_0 + sum_t m_t w_t tau_t' / max(sum_t m_t w_t, 1e-6)

Symbols -> parameters: the top-k fraction -> `select_topk` (method-wide, default 1: keep all);
`int8_mask` is accepted for mergekit configs and changes nothing. There are no per-model weights:
w_t is computed from the task vectors themselves.

As mergekit: n_nonzero counts the entries whose variance is not 0, and k is evaluated in float32
(`int(float32(n_nonzero) * float32(select_topk))`, which in double arithmetic differs in ~3% of
cases); with one model nothing varies, so any select_topk < 1 gives the base. Tie rule: when
variances equal to the k-th largest straddle the cut, the entries kept are those of mergekit's
`torch.topk` (on the CPU, in the variance's dtype; the variance itself is computed on the merge's
device, as mergekit computes it); otherwise an O(n) selection finds the only
possible set (`merge_harness.merges.sparsify.window_mask`).
Deviation: `select_topk` must lie in [0, 1] (mergekit treats values above 1 as 1 and below 0 as 0).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from pydantic import Field

from merge_harness.merges.base import MergeMethod, NoParams, Params
from merge_harness.merges.sparsify import window_mask
from merge_harness.merges.task_vectors import elect_sign, task_vectors

MIN_TOTAL = 1e-6  # mergekit's floor for the weight sum and for each entry's divisor


class SceParams(Params):
    select_topk: float = Field(
        1.0, ge=0, le=1, description="fraction of the varying entries kept, largest variance first"
    )
    int8_mask: bool = Field(False, description="accepted for mergekit configs; no effect here")


def topk_mask(values: torch.Tensor, k: int) -> torch.Tensor:
    """A boolean mask of the k largest `values`, ties at the cut broken as `torch.topk` breaks them."""
    count = values.numel()
    mask = window_mask(values, count - k, k) if k > 0 else torch.zeros(values.shape, dtype=torch.bool)
    if mask is None:  # a tie straddles the cut: mergekit's topk decides which of the tied stay
        flat = values.reshape(-1).cpu()
        chosen = torch.zeros(count, dtype=torch.bool)
        chosen[torch.topk(flat, k, largest=True).indices] = True
        mask = chosen.reshape(values.shape)
    return mask.to(values.device)


def select_by_variance(deltas: torch.Tensor, fraction: float) -> torch.Tensor:
    """SCE's Select: a (*S) mask of the entries whose task vectors (T, *S) vary most across models."""
    variance = torch.var(deltas, dim=0, correction=0)  # (*S)
    varying = int(torch.count_nonzero(variance))
    k = int(np.float32(varying) * np.float32(fraction))  # float32, as mergekit evaluates it
    return topk_mask(variance, k)


def sce_weights(deltas: torch.Tensor) -> torch.Tensor:
    """SCE's Calculate: w_t = mean(tau_t^2) / sum_j mean(tau_j^2), shape (T,); uniform if all ~0."""
    energy = deltas.square().reshape(deltas.shape[0], -1).mean(dim=1)  # (T,)
    total = energy.sum().item()
    if abs(total) < MIN_TOTAL:
        return torch.full_like(energy, 1 / energy.numel())
    return energy / total


def sce(
    base: torch.Tensor | None,
    tensors: Sequence[torch.Tensor],
    model_params: Sequence[NoParams],
    params: SceParams,
    generator: torch.Generator,
) -> torch.Tensor:
    assert base is not None
    deltas = task_vectors(base, tensors)  # (T, *S)
    if params.select_topk < 1:
        deltas *= select_by_variance(deltas, params.select_topk)
    agree = elect_sign(deltas, "sum")  # (T, *S) bool
    weights = sce_weights(deltas).reshape(-1, *([1] * base.dim())) * agree  # (T, *S): m_t w_t
    merged = (deltas * weights).sum(dim=0) / weights.sum(dim=0).clamp(min=MIN_TOTAL)
    return merged.add_(base.to(merged.dtype))


METHOD = MergeMethod(
    name="sce",
    description="keep the top-variance entries, weight models by energy, erase minority signs",
    paper="arXiv:2408.07990",
    equation="theta_0 + sum_t m_t w_t s tau_t / sum_t m_t w_t, w_t ~ mean((s tau_t)^2), s = topk Var(tau)",
    params=SceParams,
    merge_tensor=sce,
)
