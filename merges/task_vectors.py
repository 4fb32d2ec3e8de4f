"""Task vectors and TIES-style sign consensus: the shared pieces of the task-arithmetic family.

Shapes: `base` is (*S); a stack of task vectors is (T, *S) for T fine-tuned models.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

# Entries per block in `consensus_merge`: its (T, block) temporaries stay in the CPU's cache.
BLOCK = 1 << 16


def task_vectors(base: torch.Tensor, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """tau_t = theta_t - theta_0, stacked to (T, *S) in float32 (float64 stays float64)."""
    dtype = torch.float64 if base.dtype == torch.float64 else torch.float32
    base = base.to(dtype)
    deltas = torch.empty((len(tensors), *base.shape), dtype=dtype, device=base.device)
    for index, tensor in enumerate(tensors):
        torch.sub(tensor.to(dtype), base, out=deltas[index])
    return deltas


def weighted_task_sum(
    base: torch.Tensor, tensors: Sequence[torch.Tensor], weights: Sequence[float]
) -> torch.Tensor:
    """sum_t w_t (theta_t - theta_0) with one scratch tensor instead of a (T, *S) stack.

    Plain task arithmetic needs no per-task view of the task vectors, so it keeps peak memory at
    the inputs plus two tensors.
    """
    dtype = torch.float64 if base.dtype == torch.float64 else torch.float32
    base = base.to(dtype)
    total, scratch = torch.zeros_like(base), torch.empty_like(base)
    for tensor, weight in zip(tensors, weights):
        torch.sub(tensor.to(dtype), base, out=scratch)
        total.add_(scratch, alpha=weight)
    return total


def broadcast_weights(weights: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    """Per-task scalars shaped (T, 1, ..., 1) to multiply a (T, *S) stack."""
    w = torch.tensor(list(weights), dtype=like.dtype, device=like.device)
    return w.reshape(-1, *([1] * (like.dim() - 1)))


def elect_sign(weighted_deltas: torch.Tensor, method: Literal["sum", "count"] = "sum") -> torch.Tensor:
    """TIES step 2: per entry, the sign with the larger total mass ("sum") or more votes ("count").

    Returns a boolean (T, *S) mask of the entries that agree with the elected sign; zeros never
    agree, and a tie in mass elects "+" (as in TIES and mergekit).
    """
    signs = weighted_deltas.sign()
    votes = weighted_deltas.sum(dim=0) if method == "sum" else signs.sum(dim=0)
    elected = (votes >= 0).to(signs.dtype).mul_(2).sub_(1)  # +1 / -1 (3x faster than a scalar `where`)
    return signs == elected


def disjoint_merge(
    weighted_deltas: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor, normalize: bool
) -> torch.Tensor:
    """TIES step 3: sum the agreeing weighted entries; with `normalize`, divide by their weights.

    Entries where no task agrees stay 0 (the divisor is set to 1 there).
    """
    ones = mask.to(weighted_deltas.dtype)  # float * float is the same product as float * bool, faster
    merged = (weighted_deltas * ones).sum(dim=0)
    if normalize:
        divisor = torch.tensordot(weights.reshape(-1), ones, dims=1)  # sum_t w_t m_t
        divisor[divisor == 0] = 1
        merged /= divisor
    return merged


def consensus_merge(
    deltas: torch.Tensor, weights: torch.Tensor, method: Literal["sum", "count"], normalize: bool
) -> torch.Tensor:
    """TIES steps 2 and 3 on task vectors (T, *S) and weights (T, 1, ..., 1): weight them, elect
    signs, disjoint-merge. Every step is per entry, so it runs block by block over the entries:
    the same numbers as `disjoint_merge(w * deltas, w, elect_sign(w * deltas))` on the whole
    tensor, with (T, BLOCK) temporaries instead of five (T, *S) ones. `deltas` is scaled in place.
    """
    flat = deltas.reshape(len(deltas), -1)  # (T, n), a view
    column = weights.reshape(-1, 1)  # (T, 1)
    merged = torch.empty(flat.shape[1], dtype=flat.dtype, device=flat.device)
    for start in range(0, flat.shape[1], BLOCK):
        block = flat[:, start : start + BLOCK].mul_(column)
        mask = elect_sign(block, method)
        merged[start : start + BLOCK] = disjoint_merge(block, column, mask, normalize)
    return merged.reshape(deltas.shape[1:])
